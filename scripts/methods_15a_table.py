"""Markdown tables of a `forgetless run` of configs/issue15a.yaml: learned vs retained per method.

    python scripts/methods_15a_table.py runs/issue15a

For each experiment (domain, facts) and method: the final average score over the experiences
(ACC, last row of R), learning accuracy (mean of the diagonal: what each experience reached
right after it was trained), forgetting and BWT (Chaudhry et al.; Lopez-Paz & Ranzato), the
extra column after the last experience next to the base's (domain: general held-out NLL;
facts: exact match on 100 known facts, "retained"), the method's own record (mean sampled reward
of RL, mean reverse KL of on-policy distillation, parameters per progressive column) and seconds.
"""

import json
import sys
from pathlib import Path


def fmt(x, nd=3):
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def table(results: dict) -> str:
    s = results["stream"]
    lower = not s["higher_is_better"]
    extra = s["extra"]
    head = (f"| method | ACC ({s['metric']}{', lower is better' if lower else ''}) | learning acc. | forgetting | BWT | "
            f"{extra} (base) | own record | seconds |")
    lines = [head, "|" + "---|" * 8]
    for label, m in results["methods"].items():
        mt, rec = m["metrics"], m.get("method", {})
        own = ""
        if "mean_reward" in rec:
            own = "reward " + " / ".join(f"{r:.2f}" for r in rec["mean_reward"])
        elif "mean_kl" in rec:
            own = "KL " + " / ".join(f"{r:.3f}" for r in rec["mean_kl"])
        elif "growth" in rec:
            own = "params/column " + " / ".join(str(g) for g in rec["growth"])
        lines.append(f"| {label} | {fmt(mt['acc'])} | {fmt(mt['learning_accuracy'])} | {fmt(mt['forgetting'])} | "
                     f"{fmt(mt['bwt'])} | {fmt(mt[extra])} ({fmt(mt[extra + '_base'])}) | {own} | {m['seconds']:.0f} |")
    return "\n".join(lines)


def main(run_dir: str) -> None:
    for res in sorted(Path(run_dir).glob("*/results.json")):
        r = json.loads(res.read_text())
        print(f"### {r['title']} ({', '.join(r['stream']['experiences'])})\n")
        print(table(r))
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/issue15a")
