"""One module per study: which runs it needs (run) and the figures it draws (figures).

A study is a choice of knobs on the one pipeline (`thinklab.runner`); the numbers behind
its figures come from `thinklab.analysis`, so notebooks hold parameters and calls only.
"""
