"""The speed bench's ceiling rows: the matmul rate and the bare training step (timings are
measured by `python -m bench.train_speed`, never asserted here)."""

import time

import torch

from bench import op_profile as bench_profile
from bench import train_speed as bench
from fashionbench.models import build_model
from fashionbench.models.cnn import CNNArch

CPU = torch.device("cpu")


def test_matmul_rate_is_a_positive_flop_rate():
    rate = bench.matmul_gflop_per_s(CPU, torch.float32, seconds=0.05)
    assert rate > 0 and bench.matmul_size(CPU) == 2048


def test_bare_step_trains_the_model_on_resident_tensors():
    torch.manual_seed(0)
    model = build_model("cnn", CNNArch(dropout=0.5))
    before = [p.detach().clone() for p in model.parameters()]
    ips = bench.bare_step_images_per_s(model, CPU, batch=8, bf16=False, channels_last=True, steps=2)
    assert ips > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it stepped


def test_fraction_of_a_ceiling():
    assert bench._fraction(50.0, 200.0) == "25%"
    assert bench._fraction(50.0, None) == "-"


def test_profile_rows_rank_events_by_self_time_and_the_time_outside_them():
    a = torch.randn(1024, 1024)

    def run():
        with torch.profiler.record_function("annotated"):
            for _ in range(10):
                a @ a
            time.sleep(0.05)  # Python inside an annotated region: that region's self time
        time.sleep(0.05)      # no event at all: outside

    wall, rows = bench_profile.profile_rows(run)
    seconds = dict((name, s) for name, s, _ in rows)
    assert seconds["annotated"] >= 0.04 and seconds[bench_profile.OUTSIDE] >= 0.04
    assert seconds["annotated"] < 0.05 + 0.5 * seconds["aten::mm"]  # self time: not the matmuls again
    assert [s for _, s, _ in rows] == sorted((s for _, s, _ in rows), reverse=True)
    table = bench_profile.markdown("engine", wall, rows, top=2)
    assert table.count("\n| `") == 2 and "of wall" in table
