"""Fuzz every file format atexport reads: N seeded mutations per format, counts per outcome.

Each mutation (truncations, byte flips, garbage, missing/extra keys, type swaps, huge values, NaN,
tensors of other shapes and dtypes) must either load or end in atexport's own error
(``AtexportError``); anything else is a crash and is listed with its first traceback lines. The
mutators and readers are shared with ``tests/test_mutations.py`` (``tests/_mutators.py``).

    python bench/fuzz_formats.py                      # 1,000 per format
    python bench/fuzz_formats.py --count 5000 --format run_pt --seed 3

Exit status 1 when any mutation crashed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    from _helpers import make_checkpoint
    from _mutators import FORMATS, build_context, fuzz, run_one

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000, help="mutations per format [1000]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", action="append", choices=list(FORMATS), help="only these formats (repeatable)")
    ap.add_argument("--show", type=int, default=5, help="crashes to print per format [5]")
    args = ap.parse_args(argv)

    crashed = 0
    with tempfile.TemporaryDirectory(prefix="atexport-fuzz-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / "tiny.pt", num_classes=5)
        ctx = build_context(Path(tmp), ckpt)
        print(f"{'format':<18} {'mutations':>9} {'loaded':>7} {'refused':>8} {'crashed':>8} {'seconds':>8}")
        for name in args.format or list(FORMATS):
            fmt = FORMATS[name]
            base = run_one(fmt, fmt.base(ctx), ctx, "unmutated")
            if base.kind != "ok":
                print(f"{name}: the unmutated file does not load ({base.detail}); fix the fuzzer first.")
                crashed += 1
                continue
            t0 = time.perf_counter()
            counts = collections.Counter()
            errors = collections.Counter()
            crashes = []
            for o in fuzz(fmt, ctx, args.count, seed=args.seed):
                counts[o.kind] += 1
                if o.kind == "refused":
                    errors[o.detail] += 1
                elif o.kind == "crash":
                    crashes.append(o)
            dt = time.perf_counter() - t0
            print(f"{name:<18} {args.count:>9} {counts['ok']:>7} {counts['refused']:>8} {counts['crash']:>8} {dt:>8.1f}"
                  f"   refused as: {dict(errors)}")
            by_kind = collections.OrderedDict()
            for o in crashes:
                by_kind.setdefault(o.detail.split(":")[0], []).append(o)
            for kind, items in list(by_kind.items())[: args.show]:
                o = items[0]
                print(f"    CRASH x{len(items)} {o.detail}  <- {o.description}")
                print("      " + o.trace.strip().replace("\n", "\n      "))
            crashed += len(crashes)
    print(f"crashes: {crashed}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
