"""`make demo`: SmolLM2-135M-Instruct from its PyPI package to generated text, with parity."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def run_demo(outtype: str = "q8_0", prompt: str = "What is the capital of France?", n_predict: int = 48) -> None:
    import porter
    from porter.examples import materialize_smollm2
    from porter.parity.logits import compare_prompt, load_reference
    from porter.parity.metrics import TOLERANCES
    from porter.pipeline import convert

    console = Console()
    console.rule("[bold]1. checkpoint")
    ckpt = materialize_smollm2()
    console.print(f"SmolLM2-135M-Instruct checkpoint: {ckpt}")

    console.rule(f"[bold]2. convert ({outtype})")
    gguf_dir = Path(ckpt).parent / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    out = gguf_dir / f"SmolLM2-135M-Instruct.{outtype}.gguf"
    report = convert(ckpt, out, outtype, force=True)
    console.print(report.summary() if hasattr(report, "summary") else report)

    console.rule("[bold]3. run")
    with porter.load(out) as m:
        text = m.apply_chat_template([{"role": "user", "content": prompt}])
        ids = m.encode(text, add_special_tokens=False)
        console.print(f"[cyan]user:[/cyan] {prompt}")
        console.print("[cyan]assistant:[/cyan] ", end="")
        _, stats = m.generate(ids, n_predict, on_text=lambda s: console.print(s, end="", markup=False,
                                                                               highlight=False, soft_wrap=True))
        console.print()
        console.print(f"[bright_black]prompt {stats.prompt_tokens} tokens at {stats.prompt_tps:.0f} tokens/s, "
                      f"generated {stats.generated_tokens} tokens at {stats.generate_tps:.0f} tokens/s, "
                      f"{m.backend.n_threads} threads[/bright_black]")

        console.rule("[bold]4. parity against transformers (float32)")
        hf, tok = load_reference(ckpt)
        table = Table()
        for col in ("prompt", "tokens", "logits NMSE", "top-1 agree", "KL", "greedy 16 identical"):
            table.add_column(col)
        worst = 0.0
        agree = []
        for p in DEMO_PROMPTS:
            ids = tok(p)["input_ids"]
            r = compare_prompt(hf, m, ids, n_greedy=16, prompt=p)
            worst = max(worst, r.nmse_all)
            agree.append(r.top1)
            table.add_row(p, str(r.n_tokens), f"{r.nmse_all:.2e}", f"{r.top1:.0%}", f"{r.kl:.1e}",
                          "yes" if r.greedy_match else "no")
        console.print(table)
        tol = TOLERANCES.get(outtype)
        if tol:
            ok = worst <= tol["nmse"]
            console.print(f"{outtype} gate: logits NMSE <= {tol['nmse']:g}: "
                          f"{'[green]pass' if ok else '[red]FAIL'}[/] (worst {worst:.2e})")
