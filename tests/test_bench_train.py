"""benchmarks/bench_train.py --speed: the rows of the speed goals and their verdicts."""

import os

from test_cli import entry_point

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_goal_verdicts():
    bench_train = entry_point("bench_train.py")

    def result(fp32, bf16=None):
        rows = {"plain fp32 (improved-diffusion's way)": {"vs_plain": 1.0}, "engine fp32": {"vs_plain": fp32}}
        if bf16 is not None:
            rows["engine bf16 compiled channels_last"] = {"vs_plain": bf16}
        return {"configs": {"small32": {"rows": rows, "graph_breaks": 0}}}

    goals = bench_train.speed_verdicts(result(1.6, 2.4))
    assert goals["fp32 best >= 1.5x plain"] is True and goals["bf16 best >= 2.5x plain fp32"] is False
    goals = bench_train.speed_verdicts(result(1.2))
    assert goals["fp32 best >= 1.5x plain"] is False and goals["bf16 best >= 2.5x plain fp32"] is None
    assert goals["no graph breaks with fused kernels"] is True
