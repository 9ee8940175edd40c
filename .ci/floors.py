"""Print the declared dependency floors of pyproject.toml as exact pins (name==floor), one a line.

.ci/run installs them into a second environment and runs the quick tests there, so that every
floor the project declares is one that was installed and tested.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
    if match is None:
        sys.exit(f"{requirement!r} in pyproject.toml has no plain '>=' floor; give it one")
    print(f"{match.group(1)}=={match.group(2)}")
