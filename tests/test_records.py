"""Frozen records."""

from __future__ import annotations

import dataclasses

import pytest

import keybatch


def test_batch_report_is_frozen() -> None:
    report = keybatch.BatchReport(
        key="k",
        worker=0,
        start=1.0,
        operations=2,
        load_duration=0.1,
        save_duration=None,
        error=None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.operations = 3  # type: ignore[misc]
    assert dataclasses.replace(report, operations=3).operations == 3


def test_statistics_fields() -> None:
    names = [f.name for f in dataclasses.fields(keybatch.ProcessorStatistics)]
    assert names == [
        "workers",
        "keys",
        "active_batches",
        "pending_operations",
        "operations_done",
        "batches_done",
        "load_failures",
        "save_failures",
        "operation_failures",
        "operations_withdrawn",
        "stopping",
        "max_worker_queue",
        "conflicts",
        "exclusive_sections",
    ]


def test_records_support_get_type_hints() -> None:
    import typing

    hints = typing.get_type_hints(keybatch.BatchReport)
    assert hints["save_duration"] == float | None
    assert typing.get_type_hints(keybatch.ProcessorStatistics)["workers"] is int
