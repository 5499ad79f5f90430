"""Batch runs at scale: a run is a list of work items (prompt x iteration x sample, each with its
seed fixed up front), split over the processes ``torchrun`` starts, written under names given by
the item's index, and journaled so an interrupted run can be resumed.

* :mod:`.items`: :class:`WorkItem`, the items of a plain run, batching of consecutive items;
* :mod:`.jobfile`: JSONL job files (per-line settings), checked line by line;
* :mod:`.dist`: :class:`DistContext`, the processes of a run (``torch.distributed``);
* :mod:`.journal`: ``OUTDIR/journal.jsonl``, new run or resume;
* :mod:`.runner`: :func:`prepare` and :func:`run_items`, the loop, the grid and ``summary.json``.
"""
from ldm.batch.dist import DistContext, RankError
from ldm.batch.items import WorkItem, group_batches, items_digest
from ldm.batch.journal import JOURNAL_NAME, SUMMARY_NAME, read_journal
from ldm.batch.runner import BatchJob, RunStopped, prepare, run_items

__all__ = ["DistContext", "RankError", "WorkItem", "group_batches", "items_digest", "JOURNAL_NAME", "SUMMARY_NAME",
           "read_journal", "BatchJob", "RunStopped", "prepare", "run_items"]
