"""Merging a run's results into its deliverable (DESIGN.md, step 7).

- text: a tree-reduce synthesis of node summaries with bounded fan-in (`TextMerger`);
- files: one git branch per node's workspace, merged into `main` (`merge_workspaces`);
- report: RESULT.md (`render_report`).
"""

from swarm.merge.conflicts import ConflictRecord, ConflictResolver
from swarm.merge.files import FileMergeReport, branch_name, check_output_dir, merge_workspaces
from swarm.merge.reduce import reduce_groups, reduce_levels, tree_reduce
from swarm.merge.report import NodeReportRow, escape_cell, render_report
from swarm.merge.text import ChatModel, TextMerger, clip

__all__ = [
    "ChatModel",
    "ConflictRecord",
    "ConflictResolver",
    "FileMergeReport",
    "NodeReportRow",
    "TextMerger",
    "branch_name",
    "check_output_dir",
    "clip",
    "escape_cell",
    "merge_workspaces",
    "reduce_groups",
    "reduce_levels",
    "render_report",
    "tree_reduce",
]
