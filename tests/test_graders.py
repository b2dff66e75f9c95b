"""serve.graders (OpenAI's graders, one implementation) and the graders API on the local fine-tuning API.

Fast: no model downloads; score_model / label_model use a fake openai-style client; the python grader's
sandbox runs real child processes with short timeouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from serve import graders
from serve.graders import GraderInvalid, formula, grade, templates, validate

KEY = "graders-key-5c1d"
EQ = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}", "reference": "{{ item.label }}",
      "operation": "eq"}


def sc(op, input_="{{sample.output_text}}", reference="{{item.label}}"):
    return {"type": "string_check", "name": "sc", "input": input_, "reference": reference, "operation": op}


def sim(metric, reference="the cat sat on the mat"):
    return {"type": "text_similarity", "name": "sim", "input": "{{sample.output_text}}", "reference": reference,
            "evaluation_metric": metric}


def py(source, name="py"):
    return {"type": "python", "name": name, "source": source}


# ----------------------------------------------------------------------------- string_check


@pytest.mark.parametrize("op,text,label,reward", [
    ("eq", "Paris", "Paris", 1.0), ("eq", "paris", "Paris", 0.0),
    ("ne", "Paris", "Paris", 0.0), ("ne", "Rome", "Paris", 1.0),
    ("like", "It is Paris.", "Paris", 1.0), ("like", "It is paris.", "Paris", 0.0),
    ("ilike", "IT IS PARIS.", "paris", 1.0), ("ilike", "Rome", "paris", 0.0),
])
def test_string_check(op, text, label, reward):
    res = grade(sc(op), text, {"label": label})
    assert res.reward == reward and res.ok and res.scores == {"sc": reward}


# ----------------------------------------------------------------------------- text_similarity


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
                                    "rouge_5", "rouge_l"])
def test_text_similarity_identical_is_one_and_unrelated_is_zero(metric):
    same = grade(sim(metric), "the cat sat on the mat", {})
    assert same.ok and same.reward == pytest.approx(1.0)
    other = grade(sim(metric), "zebra quantum violin", {})
    assert other.ok and other.reward < 0.5  # fuzzy_match is by characters: ~0.38 here


def test_text_similarity_known_values():
    text = "the cat sat on a mat"
    assert grade(sim("fuzzy_match"), text).reward == pytest.approx(0.9047619, abs=1e-6)  # rapidfuzz ratio / 100
    assert grade(sim("rouge_1"), text).reward == pytest.approx(5 / 6)  # 5 of 6 unigrams shared both ways
    assert grade(sim("rouge_2"), text).reward == pytest.approx(3 / 5)
    assert grade(sim("gleu"), text).reward == pytest.approx(0.6111111, abs=1e-6)
    assert 0.4 < grade(sim("bleu"), text).reward < 0.7


def test_cosine_and_meteor_are_refused_in_one_line(monkeypatch):
    monkeypatch.delenv(graders.EMBEDDING_ENV, raising=False)
    with pytest.raises(GraderInvalid) as err:
        validate(sim("cosine"))
    assert err.value.param == "grader.evaluation_metric" and graders.EMBEDDING_ENV in err.value.message
    assert "\n" not in err.value.message
    if not graders._have_wordnet():
        with pytest.raises(GraderInvalid, match="WordNet"):
            validate(sim("meteor"))


def test_cosine_with_an_embedding_model_configured(monkeypatch):
    monkeypatch.setenv(graders.EMBEDDING_ENV, "emb-1")
    client = FakeClient(embeddings=[[1.0, 0.0], [1.0, 1.0]])
    res = grade(validate(sim("cosine")), "x", {}, client=client)
    assert res.reward == pytest.approx(2 ** -0.5) and client.calls[0]["model"] == "emb-1"


# ----------------------------------------------------------------------------- templates


def test_templates_item_sample_and_nested_json():
    sample = templates.make_sample('{"answer": {"city": "Paris", "list": [1, 2]}, "n": 3}')
    item = {"label": "Paris", "meta": {"tags": ["a", "b"]}}
    render = templates.render
    assert render("{{item.label}}/{{ item.meta.tags.1 }}", sample, item) == "Paris/b"
    assert render("{{ sample.output_json.answer.city }}", sample, item) == "Paris"
    assert render("{{sample.output_json.n}} {{sample.output_json.answer.list}}", sample, item) == "3 [1, 2]"
    assert render("{{ sample.output_text }}", sample, item).startswith('{"answer"')
    assert render("no variables {x}", sample, item) == "no variables {x}"
    with pytest.raises(templates.TemplateError):
        render("{{ item.missing }}", sample, item)
    with pytest.raises(templates.TemplateError):
        render("{{ __import__('os') }}", sample, item)
    with pytest.raises(templates.SampleParseError):
        render("{{ sample.output_json.x }}", templates.make_sample("not json"), item)


def test_template_errors_become_flags():
    res = grade(sc("eq", reference="{{item.nope}}"), "x", {"label": "x"})
    assert res.reward == 0 and res.errors["invalid_variable_error"] and not res.ok
    res = grade(sc("eq", input_="{{sample.output_json.a}}"), "not json", {"label": "x"})
    assert res.reward == 0 and res.errors["sample_parse_error"]
    res = grade(sc("eq", input_="{{sample.output_json.a}}"), '{"a": "x"}', {"label": "x"})
    assert res.reward == 1.0


# ----------------------------------------------------------------------------- formula


@pytest.mark.parametrize("text,value", [
    ("0.5 * a + 0.5 * b", 0.6), ("a ^ 2", 0.04), ("b + a ^ 2", 1.04), ("2 ^ 3 ^ 2", 512.0), ("a ** 2", 0.04), ("-a + 1", 0.8), ("(a + b) / 2", 0.6),
    ("min(a, b, 0.5)", 0.2), ("max(a, b)", 1.0), ("abs(a - b)", 0.8), ("floor(b * 2.5)", 2.0), ("ceil(a)", 1.0),
    ("exp(0)", 1.0), ("sqrt(4) * b", 2.0), ("log(exp(a))", 0.2), ("3", 3.0),
])
def test_formula_evaluates(text, value):
    assert formula.evaluate(text, {"a": 0.2, "b": 1.0}) == pytest.approx(value)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "a.real", "a[0]", "open('x')", "eval('1')", "(lambda: 1)()", "a if b else 1",
    "a < b", "'text'", "c + 1", "min(a, key=b)", "a; b", "0.5 * a + 0.5 * b)", "", "True + a", "abs(a, b)",
    "[a][0]", "f'{a}'", "a and b", "a // b", "a % b",
])
def test_formula_rejects(text):
    with pytest.raises(formula.FormulaError):
        formula.parse(text, {"a", "b"})


def test_formula_math_errors_are_not_parse_errors():
    with pytest.raises(ArithmeticError):
        formula.evaluate("a / (b - 1)", {"a": 1.0, "b": 1.0})
    with pytest.raises(ArithmeticError):
        formula.evaluate("9 ^ 9 ^ 9", {})  # floats: overflows fast instead of building a huge int


# ----------------------------------------------------------------------------- python (sandboxed)


def test_python_grader_returns_its_float():
    src = "def grade(sample, item):\n    print('chatty')\n    return 1.0 if sample['output_text'] == item['label'] else 0.25\n"
    assert grade(py(src), "Paris", {"label": "Paris"}).reward == 1.0
    assert grade(py(src), "Rome", {"label": "Paris"}).reward == 0.25


def test_python_grader_sees_output_json():
    src = "def grade(sample, item):\n    return float(sample['output_json']['n'] if sample['output_json'] else -1)\n"
    assert grade(py(src), '{"n": 4}', {}).reward == 4.0
    assert grade(py(src), "plain", {}).reward == -1.0


def test_python_grader_that_loops_forever_times_out():
    res = grade(py("def grade(sample, item):\n    while True:\n        pass\n"), "x", {}, timeout_s=1.5)
    assert res.reward == 0 and res.errors["python_grader_runtime_error"]
    assert "TimeoutError" in res.errors["python_grader_runtime_error_details"]
    assert res.execution_time < 10


def test_python_grader_sees_no_api_key(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-should-not-leak")
    monkeypatch.setenv("TUNEKIT_API_KEY", "tk-secret")
    src = ("import os\ndef grade(sample, item):\n"
           "    leaked = [k for k in os.environ if 'KEY' in k or 'SECRET' in k or 'TOKEN' in k]\n"
           "    return 1.0 if not leaked and os.getcwd() != item['cwd'] else 0.0\n")
    monkeypatch.chdir(tmp_path)
    assert grade(py(src), "x", {"cwd": str(tmp_path)}).reward == 1.0


def test_python_grader_exception_gives_the_last_traceback_line():
    res = grade(py("def grade(sample, item):\n    return {}['missing'] + 1\n"), "x", {})
    assert res.reward == 0 and res.errors["python_grader_runtime_error"]
    assert res.errors["python_grader_runtime_error_details"] == "KeyError: 'missing'"


def test_python_grader_bad_returns():
    res = grade(py("def grade(sample, item):\n    return 'high'\n"), "x", {})
    assert "TypeError" in res.errors["python_grader_runtime_error_details"]
    res = grade(py("def grade(sample, item):\n    return float('nan')\n"), "x", {})
    assert res.errors["python_grader_runtime_error_details"] == "ValueError: grade() returned nan"


def test_python_grader_may_use_its_folder_threads_and_numpy():
    src = ("import numpy, threading\ndef grade(sample, item):\n    open('notes.txt', 'w').write(sample['output_text'])\n"
           "    t = threading.Thread(target=print, args=('hi',)); t.start(); t.join()\n"
           "    return float(numpy.mean([len(open('notes.txt').read()), 0]))\n")
    assert grade(py(src), "abcd", {}).reward == 2.0


# ----------------------------------------------------------------------------- hostile python graders

SECRET = "sk-hostile-test-9d2f51c7"
HOSTILE = {  # what a grader tries -> the one-line reason it ends with (a python_grader_runtime_error)
    "socket to the internet": ("import socket\ndef grade(s, i):\n    socket.create_connection(('1.1.1.1', 53), "
                               "timeout=3)\n    return 1.0\n", "PermissionError: [Errno 13] Permission denied"),
    "socket to the server's own port": ("import socket\ndef grade(s, i):\n    socket.create_connection(('127.0.0.1', "
                                        "i['port']), timeout=3)\n    return 1.0\n",
                                        "PermissionError: [Errno 13] Permission denied"),
    "udp datagram out": ("import socket\ndef grade(s, i):\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                         ".sendto(b'x', ('1.1.1.1', 53))\n    return 1.0\n", "OSError: [Errno 101] Network is unreachable"),
    "API key from the environment": ("import os\ndef grade(s, i):\n    return float(len(os.environ['TUNEKIT_API_KEY']))\n",
                                     "KeyError: 'TUNEKIT_API_KEY'"),
    "any secret in the environment": ("import os\ndef grade(s, i):\n    leaked = [v for v in os.environ.values() if "
                                      "v.startswith('sk-')]\n    raise RuntimeError(f'found {len(leaked)}')\n",
                                      "RuntimeError: found 0"),
    ".env in the server's cwd": ("def grade(s, i):\n    raise RuntimeError(open(i['cwd'] + '/.env').read())\n",
                                 "PermissionError: [Errno 13] Permission denied: '{cwd}/.env'"),
    "the server's environment in /proc": ("def grade(s, i):\n    raise RuntimeError(open(f\"/proc/{i['pid']}/environ\")"
                                          ".read())\n", "PermissionError: [Errno 13] Permission denied: '/proc/{pid}/environ'"),
    "/etc/passwd": ("def grade(s, i):\n    raise RuntimeError(open('/etc/passwd').read())\n",
                    "PermissionError: [Errno 13] Permission denied: '/etc/passwd'"),
    "the project's files": ("import os\ndef grade(s, i):\n    raise RuntimeError(os.listdir(i['root']))\n",
                            "PermissionError: [Errno 13] Permission denied: '{root}'"),
    "writing outside its folder": ("def grade(s, i):\n    open('/tmp/tunekit-grader-was-here', 'w').write('x')\n",
                                   "PermissionError: [Errno 13] Permission denied: '/tmp/tunekit-grader-was-here'"),
    "killing the server": ("import os, signal\ndef grade(s, i):\n    os.kill(i['pid'], signal.SIGKILL)\n",
                           "ProcessLookupError: [Errno 3] No such process"),
    "a fork bomb": ("import os\ndef grade(s, i):\n    while True:\n        os.fork()\n",
                    "BlockingIOError: [Errno 11] Resource temporarily unavailable"),
    "a subprocess": ("import subprocess\ndef grade(s, i):\n    subprocess.run(['cat', '/etc/passwd'])\n",
                     "BlockingIOError: [Errno 11] Resource temporarily unavailable"),
    "an endless loop": ("def grade(s, i):\n    while True:\n        pass\n",
                        "TimeoutError: the grader ran longer than 2 s"),
    "a 10 GB allocation": ("def grade(s, i):\n    x = bytearray(10 * 1024 ** 3)\n    return 1.0\n", "MemoryError"),
    "flooding its output": ("def grade(s, i):\n    while True:\n        print('x' * 65536)\n",
                            "OSError: [Errno 27] File too large"),
}


@pytest.fixture(scope="module")
def sandboxed():
    from serve.graders.sandbox import isolation

    if not isolation().complete:  # what the refusal looks like there is test_incomplete_isolation_...
        pytest.skip(f"this OS does not grant the sandbox's layers: {isolation().describe()}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One app for the hostile graders (each test's own would cost a second apiece)."""
    from fastapi.testclient import TestClient

    from serve.finetune_api import FinetuneAPIConfig, create_app

    app = create_app(FinetuneAPIConfig(data_dir=str(tmp_path_factory.mktemp("hostile"))), KEY, run_worker=False)
    yield TestClient(app, headers={"Authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)
    app.state.store.close()


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_hostile_python_graders_end_as_grader_errors(sandboxed, attack, served, tmp_path, monkeypatch, caplog):
    """Each through the graders API of a server whose cwd holds a .env and whose environment holds its key: a grader
    error with its reason; nothing of the secrets in the response or the log; the server serves on."""
    import logging
    import os

    from conftest import ROOT

    (tmp_path / ".env").write_text(f"TUNEKIT_API_KEY={SECRET}\nOPENAI_API_KEY={SECRET}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEKIT_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    # the route grades with the default timeout: short for the endless loop, and long enough for the rest on a
    # machine that is busy
    monkeypatch.setattr(graders.sandbox, "DEFAULT_TIMEOUT_S", 2.0 if attack == "an endless loop" else 60.0)
    source, reason = HOSTILE[attack]
    item = {"cwd": str(tmp_path), "pid": os.getpid(), "root": str(ROOT), "port": 8100}
    caplog.set_level(logging.DEBUG)
    resp = served.post("/v1/fine_tuning/alpha/graders/run",
                       json={"grader": py(source), "model_sample": "x", "item": item})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    errors = body["metadata"]["errors"]
    assert body["reward"] == 0 and errors["python_grader_runtime_error"] and not errors["python_grader_server_error"]
    assert errors["python_grader_runtime_error_details"] == reason.format(**item)
    assert SECRET not in resp.text and SECRET not in caplog.text and "root:x:0:0" not in resp.text
    assert not Path("/tmp/tunekit-grader-was-here").exists()
    ok = served.post("/v1/fine_tuning/alpha/graders/run", json={"grader": EQ, "model_sample": "a", "item": {"label": "a"}})
    assert ok.json()["reward"] == 1.0 and served.get("/health").json() == {"status": "ok"}


def test_the_sandbox_leaves_no_process_behind(sandboxed):
    import psutil

    src = "import os, time\ndef grade(s, i):\n    os.setsid()\n    time.sleep(60)\n"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    res = grade(py(src), "x", {}, timeout_s=1.0)
    assert "TimeoutError" in res.errors["python_grader_runtime_error_details"]
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_incomplete_isolation_refuses_python_graders_unless_allowed(monkeypatch):
    from serve.graders import sandbox

    monkeypatch.setattr(sandbox, "_probe", sandbox.Isolation(user_ns=False, net_ns=False, pid_ns=False, landlock=7,
                                                             no_fork=True))
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    src = "def grade(s, i):\n    return 0.5\n"
    res = grade(py(src), "x", {})
    assert res.reward == 0 and res.errors["python_grader_server_error"]
    assert res.errors["python_grader_server_error_type"].startswith(
        "python graders are refused on this machine: NOT fully isolated: this OS refuses unprivileged user namespaces, "
        "network namespaces, PID namespaces; set TUNEKIT_PYTHON_GRADERS=on")
    assert grade(py(src), "x", {}, allow_unisolated=True).reward == 0.5
    monkeypatch.setenv(sandbox.ALLOW_ENV, "on")
    assert grade(py(src), "x", {}).reward == 0.5


def test_python_grader_source_limits():
    with pytest.raises(GraderInvalid, match="256 KB"):
        validate(py("def grade(s, i):\n    return 1.0\n" + "#" * (256 * 1024)))
    with pytest.raises(GraderInvalid) as err:
        validate(py("def nope(s, i):\n    return 1.0\n"))
    assert err.value.param == "grader.source"
    with pytest.raises(GraderInvalid, match="line 1"):
        validate(py("def grade(:\n"))


# ----------------------------------------------------------------------------- model graders (fake client)


class FakeClient:
    """chat.completions.create / embeddings.create, answering from a list; records the calls."""

    def __init__(self, answers=(), embeddings=None, fail=None, refusal=None):
        self.answers, self.embs, self.fail, self.refusal, self.calls = list(answers), embeddings, fail, refusal, []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._chat))
        self.embeddings = SimpleNamespace(create=self._embed)

    def _chat(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail:
            raise self.fail
        message = SimpleNamespace(content=self.answers.pop(0) if self.answers else "", refusal=self.refusal)
        usage = SimpleNamespace(prompt_tokens=10, completion_tokens=2, total_tokens=12)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)], usage=usage)

    def _embed(self, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(data=[SimpleNamespace(embedding=e) for e in self.embs], usage=None)


SCORE = {"type": "score_model", "name": "judge", "model": "judge-model", "range": [0, 10],
         "sampling_params": {"temperature": 0, "seed": 1, "max_completions_tokens": 50},
         "input": [{"role": "system", "content": "Grade the answer."},
                   {"role": "user", "content": [{"type": "input_text",
                                                 "text": "Q: {{item.q}} A: {{sample.output_text}}"}]}]}
LABEL = {"type": "label_model", "name": "mood", "model": "judge-model", "labels": ["positive", "neutral", "negative"],
         "passing_labels": ["positive"], "input": [{"role": "user", "content": "Classify: {{sample.output_text}}"}]}


def test_score_model():
    client = FakeClient(['{"result": 7.5}'])
    res = grade(validate(SCORE), "42", {"q": "6*7?"}, client=client)
    assert res.reward == 7.5 and res.ok and res.token_usage == 12 and res.sampled_model_name == "judge-model"
    assert res.usage_per_model["judge-model"]["total_tokens"] == 12
    call = client.calls[0]
    assert call["model"] == "judge-model" and call["temperature"] == 0 and call["max_tokens"] == 50
    assert call["messages"][1]["content"] == "Q: 6*7? A: 42"
    assert grade(SCORE, "x", {"q": "?"}, client=FakeClient(["Score: 12"])).reward == 10  # clipped to range
    bad = grade(SCORE, "x", {"q": "?"}, client=FakeClient(["no idea"]))
    assert bad.reward == 0 and bad.errors["model_grader_parse_error"]
    down = grade(SCORE, "x", {"q": "?"}, client=FakeClient(fail=ConnectionError("refused")))
    assert down.errors["model_grader_server_error"] and "refused" in down.errors["model_grader_server_error_details"]
    refused = grade(SCORE, "x", {"q": "?"}, client=FakeClient(["{}"], refusal="I can't"))
    assert refused.errors["model_grader_refusal_error"]


def test_label_model_only_inside_multi():
    with pytest.raises(GraderInvalid) as err:
        validate(LABEL)
    assert err.value.param == "grader.type"
    multi = {"type": "multi", "name": "m", "graders": {"mood": LABEL, "exact": EQ},
             "calculate_output": "0.5 * mood + 0.5 * exact"}
    validate(multi)
    res = grade(multi, "great", {"label": "great"}, client=FakeClient(['{"label": "positive"}']))
    assert res.reward == 1.0 and res.sub_rewards == {"mood": 1.0, "exact": 1.0}
    assert res.scores == {"mood": "positive", "exact": 1.0}
    res = grade(multi, "meh", {"label": "great"}, client=FakeClient(["Neutral"]))
    assert res.reward == 0.0 and res.sub_rewards == {"mood": 0.0, "exact": 0.0}
    res = grade(multi, "great", {"label": "great"}, client=FakeClient(["banana"]))
    assert res.errors["model_grader_parse_error"] and res.reward == 0


# ----------------------------------------------------------------------------- multi


def test_multi_combines_sub_rewards():
    multi = {"type": "multi", "name": "m", "calculate_output": "0.25 * sim + 0.75 * exact",
             "graders": {"sim": sim("fuzzy_match", "Paris"), "exact": sc("eq")}}
    res = grade(validate(multi), "Paris", {"label": "Paris"})
    assert res.reward == pytest.approx(1.0) and res.sub_rewards == {"sim": 1.0, "exact": 1.0}
    res = grade(multi, "Pariss", {"label": "Paris"})
    assert res.reward == pytest.approx(0.25 * (1 - 1 / 11)) and res.sub_rewards["exact"] == 0.0


def test_multi_errors():
    multi = {"type": "multi", "name": "m", "calculate_output": "__import__('os')", "graders": {"a": sc("eq")}}
    with pytest.raises(GraderInvalid) as err:
        validate(multi)
    assert err.value.param == "grader.calculate_output"
    res = grade(multi, "x", {"label": "x"})
    assert res.reward == 0 and res.errors["formula_parse_error"]
    div = {"type": "multi", "name": "m", "calculate_output": "1 / (a - 1)", "graders": {"a": sc("eq")}}
    res = grade(div, "x", {"label": "x"})
    assert res.reward == 0 and res.errors["other_error"] and not res.errors["formula_parse_error"]
    crash = {"type": "multi", "name": "m", "calculate_output": "a + b",
             "graders": {"a": sc("eq"), "b": py("def grade(s, i):\n    raise ValueError('bad')\n")}}
    res = grade(crash, "x", {"label": "x"})
    assert res.reward == 0 and res.errors["python_grader_runtime_error_details"] == "ValueError: bad"
    with pytest.raises(GraderInvalid, match="nested"):
        validate({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": div}})


def test_multi_with_a_single_grader_as_the_sdk_types_it():
    multi = {"type": "multi", "name": "m", "calculate_output": "2 * exact", "graders": EQ}
    assert grade(validate(multi), "x", {"label": "x"}).reward == 2.0


@pytest.mark.parametrize("grader,param", [
    ({"type": "string_check", "name": "s", "input": "a", "reference": "b", "operation": "regex"}, "grader.operation"),
    ({"type": "string_check", "name": "s", "input": "a", "operation": "eq"}, "grader.reference"),
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}, "grader.name"),
    ({"type": "nope", "name": "n"}, "grader.type"),
    ({**sim("bleu"), "evaluation_metric": "wer"}, "grader.evaluation_metric"),
    ({**SCORE, "range": [1, 0]}, "grader.range"),
    ({**SCORE, "input": []}, "grader.input"),
    ({**EQ, "input": "{{ os.environ }}"}, "grader.input"),
    ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {**EQ, "operation": "x"}}},
     "grader.graders.a.operation"),
])
def test_validate_names_the_param(grader, param):
    with pytest.raises(GraderInvalid) as err:
        validate(grader)
    assert err.value.param == param


# ----------------------------------------------------------------------------- the API and the SDK


@pytest.fixture
def app(tmp_path):
    from serve.finetune_api import FinetuneAPIConfig, create_app

    app = create_app(FinetuneAPIConfig(data_dir=str(tmp_path / "data")), KEY, run_worker=False)
    yield app
    app.state.store.close()


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)


@pytest.fixture
def sdk(client):
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def test_run_route_matches_openais_schema(client, openapi_validate):
    resp = client.post("/v1/fine_tuning/alpha/graders/run",
                       json={"grader": EQ, "model_sample": "Paris", "item": {"label": "Paris"}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    openapi_validate(body, "RunGraderResponse")
    assert body["reward"] == 1.0 and body["metadata"]["type"] == "string_check"
    bad = client.post("/v1/fine_tuning/alpha/graders/run",
                      json={"grader": py("def grade(s, i):\n    raise RuntimeError('x')\n"), "model_sample": "a"})
    openapi_validate(bad.json(), "RunGraderResponse")
    assert bad.json()["metadata"]["errors"]["python_grader_runtime_error_details"] == "RuntimeError: x"


def test_run_route_uses_the_apps_grader_client(app, client, openapi_validate):
    app.state.grader_client = FakeClient(['{"result": 0.9}'])
    body = client.post("/v1/fine_tuning/alpha/graders/run",
                       json={"grader": SCORE, "model_sample": "42", "item": {"q": "?"}}).json()
    openapi_validate(body, "RunGraderResponse")
    assert body["reward"] == 0.9 and body["metadata"]["token_usage"] == 12
    assert body["model_grader_token_usage_per_model"]["judge-model"]["total_tokens"] == 12


def test_routes_refuse_with_openais_envelope(client):
    def refused(path, payload, param, code="invalid_value"):
        resp = client.post(f"/v1/fine_tuning/alpha/graders/{path}", json=payload)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err

    refused("validate", {"grader": {**EQ, "operation": "regex"}}, "grader.operation")
    refused("validate", {}, "grader", "missing_required_parameter")
    refused("run", {"grader": EQ}, "model_sample", "missing_required_parameter")
    refused("run", {"grader": EQ, "model_sample": 3}, "model_sample", "invalid_type")
    refused("run", {"grader": LABEL, "model_sample": "x"}, "grader.type")
    resp = client.post("/v1/fine_tuning/alpha/graders/run", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 400


def test_the_sdk_runs_and_validates_graders(sdk, openapi_validate):
    import openai

    multi = {"type": "multi", "name": "m", "calculate_output": "0.5 * exact + 0.5 * sim",
             "graders": {"exact": EQ, "sim": sim("rouge_l", "{{item.label}}")}}
    run = sdk.fine_tuning.alpha.graders.run(grader=multi, model_sample="Paris", item={"label": "Paris"})
    assert run.reward == 1.0 and run.sub_rewards == {"exact": 1.0, "sim": 1.0}
    assert run.metadata.errors.formula_parse_error is False and run.metadata.name == "m"
    checked = sdk.fine_tuning.alpha.graders.validate(grader=EQ)
    assert checked.grader.operation == "eq"
    openapi_validate(checked.model_dump(exclude_none=True), "ValidateGraderResponse")
    with pytest.raises(openai.BadRequestError) as err:
        sdk.fine_tuning.alpha.graders.validate(grader={**EQ, "operation": "regex"})
    assert err.value.param == "grader.operation" and err.value.status_code == 400


@pytest.mark.parametrize("grader,schema", [
    (EQ, "GraderStringCheck"), (sim("gleu"), "GraderTextSimilarity"), (py("def grade(s, i):\n    return 1\n"),
                                                                          "GraderPython"),
    (SCORE, "GraderScoreModel"), (LABEL, "GraderLabelModel"),
    ({"type": "multi", "name": "m", "calculate_output": "2 * exact", "graders": EQ}, "GraderMulti"),
])
def test_the_graders_used_here_are_openais_shapes(grader, schema, openapi_validate):
    openapi_validate(grader, schema)
    validate(grader, inside_multi=grader["type"] == "label_model")


def test_validate_route_answers_the_grader(client, openapi_validate):
    for grader in (EQ, sim("bleu"), SCORE):
        resp = client.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": grader})
        assert resp.status_code == 200 and resp.json() == {"grader": grader}
        openapi_validate(resp.json(), "ValidateGraderResponse")
    assert json.loads(json.dumps(EQ)) == EQ
