"""Print the embedded models' weight packages listed in pyproject.toml ([tool.thinklab])."""

import pathlib
import tomllib

root = pathlib.Path(__file__).resolve().parents[1]
print(" ".join(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["thinklab"]["model-packages"]))
