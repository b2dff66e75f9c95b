"""serve.distil: a model's answers to a prompt set as trainable chat JSONL; units, then a real run.

The real run distils the session's vLLM CPU server's `finetuned` adapter, checks every prompt is
accounted for, that `data_prep validate` accepts the file, that the answers are the server's own at
temperature 0, that --resume sends nothing twice, and that train/sft.py trains on the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SMOL, SMOL_SYSTEM, SMOL_TOY, chat_rows, free_port, run_cli, write_jsonl

SYS = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def bot(text, **kw):
    return {"role": "assistant", "content": text, **kw}


# ---- input handling, without a server ---------------------------------------------------------

def test_prompts_are_cut_at_the_last_user_message(tmp_path):
    from serve.distil import load_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [SYS, user("q1"), bot("old answer")]},                         # answer dropped
        {"messages": [user("q2")]},                                                  # config's system added
        {"messages": [SYS, user("a"), bot("b"), user("c"), bot("dropped")]},         # multi-turn
        {"messages": [SYS, bot("no question")]},                                     # no prompt
        {"messages": [SYS, user("")]},                                               # not a valid example
        {"messages": [SYS, user("q6")]},
    ])
    prompts, skipped = load_prompts(path, default_system="From config.")
    assert [p.line for p in prompts] == [1, 2, 3, 6] and [p.idx for p in prompts] == [0, 1, 2, 5]
    assert prompts[0].messages == [SYS, user("q1")] and prompts[0].reference == "old answer"
    assert prompts[1].messages == [{"role": "system", "content": "From config."}, user("q2")]
    assert prompts[2].messages == [SYS, user("a"), bot("b"), user("c")] and prompts[2].reference == "dropped"
    assert prompts[2].keep == [SYS, user("a"), bot("b", weight=0), user("c")]  # earlier turns: context only
    assert [(s["line"], s["reason"]) for s in skipped] == [(4, "no_user_message"), (5, "invalid_prompt")]
    assert "missing_content" in skipped[1]["detail"]

    prompts, _ = load_prompts(path, system="Override.", default_system="From config.", limit=2)
    assert [p.messages[0] for p in prompts] == [{"role": "system", "content": "Override."}] * 2
    prompts, _ = load_prompts(path, system="")
    assert prompts[0].messages == [user("q1")] and prompts[1].messages == [user("q2")]


def test_weights_are_kept_but_never_sent(tmp_path):
    from serve.distil import load_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [user("a"), bot("b", weight=1), user("c")]}])
    (p,), _ = load_prompts(path)
    assert p.messages == [user("a"), bot("b"), user("c")]
    assert p.keep[1] == bot("b", weight=1)


@pytest.mark.parametrize("line, expected", [('{"text": "hi"}', ":2: expected"), ("not json", ":2:"),
                                            ('{"messages": [{"content": "x"}]}', ":2: expected")])
def test_a_line_that_is_no_chat_is_an_error_naming_it(tmp_path, line, expected):
    from serve.distil import load_prompts
    from tunekit.errors import UserError

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": [user("ok")]}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=expected):
        load_prompts(path)


# ---- the report's accounting ------------------------------------------------------------------

def rec(idx, answer="ok", finish="stop", error=None, tin=10, tout=2):
    return {"idx": idx, "answer": answer, "finish_reason": finish, "error": error, "input_tokens": tin,
            "output_tokens": tout}


def test_every_prompt_is_answered_or_skipped_with_its_reason(tmp_path):
    from serve.distil import account, load_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [SYS, user(f"q{i}")]} for i in range(7)]
                       + [{"messages": [SYS]}])
    prompts, skipped = load_prompts(path)
    recs = {0: rec(0, "A"), 1: rec(1, "   "), 2: rec(2, "cut", finish="length"),
            3: rec(3, None, finish="content_filter"), 4: {**rec(4, None, error="http_500", tin=None, tout=None),
                                                          "error_message": "boom"},
            5: rec(5, "B")}  # 6 never finished (Ctrl-C)
    rows, report = account(prompts, skipped, recs, "local", "finetuned")
    assert rows == [{"messages": [SYS, user("q0"), bot("A")]}, {"messages": [SYS, user("q5"), bot("B")]}]
    assert report["prompts"] == 8 and report["answered"] == 2
    assert report["skipped"] == {"no_user_message": 1, "empty": 1, "truncated": 1, "refusal": 1,
                                 "error:http_500": 1, "not_sent": 1}
    assert report["answered"] + sum(report["skipped"].values()) == report["prompts"]
    assert [s["line"] for s in report["skipped_prompts"]] == [2, 3, 4, 5, 7, 8]
    assert report["skipped_prompts"][3]["detail"] == "boom"
    assert (report["input_tokens"], report["output_tokens"]) == (50, 10)  # every response received is billed
    assert report["cost_usd"] is None and "local" in report["cost_basis"]


def test_openai_cost_comes_from_prices_yaml(tmp_path):
    from serve.distil import account, load_prompts

    prompts, _ = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"messages": [user("q")]}]))
    recs = {0: rec(0, tin=1_000_000, tout=1_000_000)}
    _, report = account(prompts, [], recs, "openai", "ft:gpt-4o-mini-2024-07-18:org:demo:abc123")
    assert report["cost_usd"] == pytest.approx(0.30 + 1.20) and report["cost_basis"] == "tunekit/prices.yaml"
    _, report = account(prompts, [], recs, "openai", "ft:some-new-model:org::x")
    assert report["cost_usd"] is None and "no price for ft:some-new-model" in report["cost_basis"]


def test_resume_refuses_answers_of_other_prompts_or_models(tmp_path):
    from serve.distil import check_manifest
    from tunekit.errors import UserError

    base = {"model_id": "m", "sampling": {"temperature": 0}, "prompts": {"0": "aa", "1": "bb"}}
    check_manifest(tmp_path, base, resume=False)
    check_manifest(tmp_path, {**base, "prompts": {"0": "aa", "1": "bb", "2": "cc"}}, resume=True)  # a larger limit
    with pytest.raises(UserError, match="1 prompt\\(s\\) differ .* prompt 2"):
        check_manifest(tmp_path, {**base, "prompts": {"0": "aa", "1": "XX"}}, resume=True)
    with pytest.raises(UserError, match="model_id 'm'"):
        check_manifest(tmp_path, {**base, "model_id": "other"}, resume=True)
    check_manifest(tmp_path, {**base, "model_id": "other"}, resume=False)  # without --resume: a fresh start


def test_bad_flags_and_a_missing_server_are_one_line(tmp_path):
    proc = run_cli("-m", "serve.distil", "--data", str(tmp_path / "none.jsonl"), "--out", "x.txt",
                   "--concurrency", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none.jsonl not found" in proc.stderr and "should end in .jsonl" in proc.stderr
    assert "concurrency: 0 must be at least 1" in proc.stderr
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump({"backend": "local", "server": {"port": free_port()}}))
    data = write_jsonl(tmp_path / "p.jsonl", chat_rows(SMOL_TOY[:3]))
    proc = run_cli("-m", "serve.distil", "--serve-config", str(serve), "--model", "base", "--data", str(data),
                   "--out", str(tmp_path / "out.jsonl"), timeout=60)
    assert proc.returncode == 2 and "no server answers at" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out.jsonl").exists()


# ---- a real run against the session's vLLM server ---------------------------------------------

PROMPTS = 12


@pytest.fixture(scope="module")
def distilled(vllm_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("distil")
    rows = chat_rows(SMOL_TOY[:PROMPTS])
    for i, r in enumerate(rows):
        r["messages"][-1]["content"] = f"REFERENCE {i}"  # must not survive: the answers are the model's
    rows[3]["messages"] = rows[3]["messages"][1:]       # no system message: the serve config's is used
    rows.append({"messages": [{"role": "system", "content": SMOL_SYSTEM}, bot("no question here")]})
    write_jsonl(d / "prompts.jsonl", rows)
    out = d / "out" / "train.jsonl"
    args = ["--serve-config", str(vllm_server.config), "--model", "finetuned", "--data", str(d / "prompts.jsonl"),
            "--out", str(out), "--concurrency", "4"]
    proc = subprocess.run([sys.executable, "-m", "serve.distil", *args], cwd=ROOT, env=vllm_server.env(),
                          capture_output=True, text=True, timeout=300)
    return d, out, args, proc


def test_distil_accounts_for_every_prompt_and_validates(distilled):
    d, out, _, proc = distilled
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((d / "out/train.distil/report.json").read_text())
    assert report["prompts"] == PROMPTS + 1 and report["model_id"] == "finetuned"
    assert report["answered"] + sum(report["skipped"].values()) == report["prompts"]
    assert report["skipped"].get("no_user_message") == 1 and report["answered"] >= 10, report["skipped_prompts"]
    assert not any(r.startswith("error:") for r in report["skipped"])
    assert report["input_tokens"] > 0 and report["output_tokens"] > 0 and report["wall_s"] > 0
    assert report["sampling"]["temperature"] == 0.0 and report["complete"] is True
    assert f"{report['answered']} of {PROMPTS + 1} prompts answered" in proc.stdout
    assert "requests" in proc.stderr  # the progress bar
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report["answered"] and not list(out.parent.glob("*.tmp"))
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"] and r["messages"][0]["content"] == SMOL_SYSTEM
        assert "REFERENCE" not in r["messages"][-1]["content"] and r["messages"][-1]["content"].strip()
    proc = run_cli("-m", "data_prep", "validate", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_answers_are_what_the_server_says_at_temperature_0(distilled, vllm_server):
    import openai

    _, out, _, proc = distilled
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    client = openai.OpenAI(base_url=vllm_server.base_url, api_key=vllm_server.api_key)
    sampling = yaml.safe_load(vllm_server.config.read_text())["sampling"]
    for r in (rows[0], rows[3]):  # rows[3] had no system message in the prompt set
        reply = client.chat.completions.create(model="finetuned", messages=r["messages"][:-1], **sampling)
        assert reply.choices[0].message.content == r["messages"][-1]["content"]


def test_resume_sends_nothing_twice(distilled, vllm_server):
    d, out, args, proc = distilled
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = d / "out/train.distil/raw/finetuned.jsonl"
    before, lines = out.read_text(), len(raw.read_text().splitlines())
    tunekit = Path(sys.executable).parent / "tunekit"
    proc = subprocess.run([str(tunekit), "distil", *args, "--resume"], cwd=ROOT, env=vllm_server.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((d / "out/train.distil/report.json").read_text())
    assert out.read_text() == before and len(raw.read_text().splitlines()) == lines
    assert report["resumed"] == PROMPTS  # answered and empty/truncated alike are kept: the same at temperature 0


def test_sft_trains_on_the_distilled_file(distilled, tmp_path, capsys):
    """A 4-step LoRA run of train/sft.py on OUT (the smol_adapter recipe, smaller), in this process through the
    script's own wrapper: launched, the same run spent ~25 s importing (the accelerate-launched runs are
    smol_adapter's and test_sft.py's)."""
    _, out, _, proc = distilled
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load((ROOT / "configs/banking77/sft_cpu.yaml").read_text())
    cfg.pop("valid_file")
    # num_threads 1: in this process OpenMP threads spin while they wait (sft.py asks for OMP_WAIT_POLICY=PASSIVE
    # only when it runs as a script), and two of them on 2 cores crawl as soon as anything else runs
    cfg.update(train_file=str(out), model_name_or_path=str(SMOL), output_dir=str(tmp_path / "run"), max_length=64,
               num_threads=1, per_device_train_batch_size=4, warmup_steps=0, lr_scheduler_type="constant",
               max_steps=4, logging_steps=2, eval_strategy="no", save_strategy="no", lora_r=8, lora_alpha=16,
               plots=False)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    import train.sft as sft
    from tunekit.errors import run_main

    rc = run_main(sft.main, ["--config", str(tmp_path / "sft.yaml")])
    printed = capsys.readouterr()
    assert rc == 0, printed.out[-3000:] + printed.err[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_examples"] == len(out.read_text().splitlines())
    assert (tmp_path / "run/adapter_config.json").is_file()
