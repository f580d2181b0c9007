"""One module per study, all with the same contract.

Each of `overthinking`, `temperature`, `quantization` and `moe` exposes exactly:
`STUDY` (its name, the figures' folder), `Params` (its checked parameters, extending
`common.StudyParams`), `conditions(params) -> list[RunSpec]`, `run(specs) -> DataFrame`
(the only call that generates), `frames(df, params=None) -> {name: DataFrame}` (every
table behind a figure, plus `summary`: n and the truncated share per condition) and
`FIGURES: {name: fig(frames)}`. A notebook is its parameters, `common.notebook_params`,
`run`, one loop over `FIGURES` through `thinklab.plots.show`, and `explore.explore`.
"""
