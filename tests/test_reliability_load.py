"""A short version of the acceptance run (bench/faults.py): load with faults injected, ClearIP
resets and timeouts, failing and silent carriers, 5 % packet loss; every INVITE gets a final."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.faults import KINDS, run

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.sipp, pytest.mark.slow]


def test_every_invite_gets_a_final_under_faults_and_loss(tmp_path: Path) -> None:
    report = run(20, 6, loss=5.0, delay_ms=2.0, workdir=tmp_path)
    assert len(report.seen.invites) == 120
    assert report.unanswered == 0, sorted(report.seen.unanswered)
    assert report.netem_dropped > 0, "no packet was lost: the impairment did not apply"
    # The faults happened and each kind got the final it should (503 fail-open can also hit
    # other kinds while a reset connection is re-opened).
    for kind in ("clearip-silent", "clearip-late"):
        assert set(report.by_kind.get(kind, {})) <= {KINDS[kind][1]}, (kind, report.by_kind)
    assert report.by_kind["normal"][200] >= 0.7 * sum(report.by_kind["normal"].values())
    assert report.relay.get("route_advance", 0) > 0
