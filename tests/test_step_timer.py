"""The step split (training/step.py StepTimer): forward/backward and the rest add up to the step's
wall time, with no host read of its own. On CUDA the forward/backward part is the GPU time between
two events (read after the step's own host read); the GPU check measures it there."""

import time

import torch

from megatron_mmbert.training.step import StepTimer
from tests.helpers.model import HostReads


def test_the_split_adds_up_to_the_step_and_reads_nothing_from_the_device():
    timer = StepTimer(torch.device("cpu"))
    HostReads.count = 0
    with HostReads():
        timer.mark()
        time.sleep(0.02)
        x = torch.ones(4).sum()
        timer.mark()
        time.sleep(0.01)
        timer.mark()
    assert HostReads.count == 0 and x == 4
    forward_backward, rest = timer.split()
    wall = timer.marks[-1][0] - timer.marks[0][0]
    assert forward_backward >= 0.02 and rest >= 0.01
    assert abs(forward_backward + rest - wall) < 1e-9


def test_timing_off_records_nothing():
    timer = StepTimer(torch.device("cpu"), enabled=False)
    for _ in range(3):
        timer.mark()
    assert timer.marks == [] and timer.split() == (0.0, 0.0)


def test_one_progress_format_for_every_stage():
    import io

    from megatron_mmbert.progress import Progress, format_eta, human

    assert format_eta(3725.9) == "1:02:05" and format_eta(None) == "n/a" and format_eta(float("nan")) == "n/a"
    assert human(1_234_567) == "1.2M" and human(999) == "999"
    out = io.StringIO()
    p = Progress("evaluate", 4, "languages", out, every_s=3600)
    p.start -= 10.0  # ten seconds in
    p.advance(1, "eng_Latn")  # not yet due: silent
    assert out.getvalue() == ""
    p.advance(3, "fra_Latn")  # the end: always printed
    line = out.getvalue().strip()
    assert line.startswith("[evaluate] fra_Latn: 100.0% (4/4 languages), 0.4 languages/s") and line.endswith("ETA 0:00:00")
