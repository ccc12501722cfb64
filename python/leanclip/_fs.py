"""Filesystem helpers shared by every module that writes: one home for path types and atomic writes."""

from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]
