"""UI <-> API workflow conversion and validation: aligned_trainer/headless/workflow.py, shared with the
headless command and scripts/demo.py."""
from __future__ import annotations

from .headless import module

_m = module("workflow")
FILE_INPUTS = _m.FILE_INPUTS
SKIP_TYPES = _m.SKIP_TYPES
WIDGET_TYPES = _m.WIDGET_TYPES
load = _m.load
object_info_inprocess = _m.object_info_inprocess
ui_to_api = _m.ui_to_api
validate = _m.validate
widget_names = _m.widget_names
