"""What the observation seam costs per turn, in process CPU time (immune to other processes on a
loaded machine, unlike the wall-clock throughput of ask_remote.py --metrics): the fan-out with
no observer, with the status rates (every node), and with the rates plus Prometheus metrics.

    python bench/observe_cost.py [--json]

Compare with the node's CPU per remote ask that ask_remote.py prints (tens of microseconds):
metrics cost less than 5 % of it when `metrics_us_per_turn` is below 5 % of that figure.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from typing import Any

from _common import emit, parser

from accord._observe import Observers
from accord.runtime._bulkhead import Bulkhead
from accord.runtime._metrics import NodeMetrics
from accord.runtime._rates import Rates
from accord.runtime._settings import NodeSettings, Stats


def cpu_us(fn: Callable[[], Any], n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=7, timer=time.process_time)) / n * 1e6


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="turns per repetition")
    args = p.parse_args()
    bulkhead = Bulkhead(NodeSettings(), Stats(), "n1")
    off, rates_only, both = Observers(), Observers(), Observers()
    rates = Rates(["counter"], bulkhead, Stats())
    rates_only.add(rates)
    both.add(rates)
    both.add(NodeMetrics(["counter"], {}))

    def turn(o: Observers) -> Callable[[], None]:
        def one() -> None:
            if o.active:  # what the activation does around each handler run
                o.turn_ended("counter", "ask", "ok", 0.001)

        return one

    res: dict[str, Any] = {
        "benchmark": "observe_cost",
        "off_us_per_turn": cpu_us(turn(off), args.n),
        "rates_us_per_turn": cpu_us(turn(rates_only), args.n),
        "metrics_us_per_turn": cpu_us(turn(both), args.n),
        "params": {"n": args.n},
    }
    lines = [
        "observe_cost  (process CPU µs per turn reported to the seam)",
        f"  no observer       {res['off_us_per_turn']:6.3f}",
        f"  status rates      {res['rates_us_per_turn']:6.3f}   (every node)",
        f"  rates + metrics   {res['metrics_us_per_turn']:6.3f}   (--metrics-port)",
    ]
    emit(res, args.json, lines)


if __name__ == "__main__":
    main()
