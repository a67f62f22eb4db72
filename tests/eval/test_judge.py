"""MM-Vet graded by an LLM judge behind an OpenAI-compatible endpoint: a fake judge server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from matvlm.cli import main
from matvlm.errors import MatvlmError
from matvlm.eval.benchmarks import get_benchmark
from matvlm.eval.judge import PROMPT_NAME, load_judge, parse_mark, render_prompt

from .test_benchmarks import mmvet_data, write


class FakeJudge:
    """A chat-completions server whose reply is ``reply(content)``; it records every request."""

    def __init__(self, reply):
        self.requests = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                text = reply(body["messages"][0]["content"])
                if text is None:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"boom")
                    return
                out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge():
    servers = []

    def start(reply):
        servers.append(FakeJudge(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def marks_by_question(content):
    """0.8 for the x question, 0.3 for the animals, 1.0 otherwise."""
    return "0.8" if "What is x?" in content else "0.3 (partly)" if "animals" in content else "1.0"


def test_mmvet_graded_by_a_judge_endpoint(tmp_path, fake_judge, capsys, monkeypatch):
    judge = fake_judge(marks_by_question)
    data = mmvet_data(tmp_path / "mmvet")
    answers = write(tmp_path / "a.jsonl", "".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, t in
                                                   [(0, "x is five"), (1, "a cat"), (2, "2004")]))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    assert main(["eval", "--benchmark", "mmvet", "--data", str(data), "--predictions", str(answers), "--output",
                 str(tmp_path / "r.json"), "--judge-url", judge.url, "--judge-model", "grader-1",
                 "--judge-api-key-env", "MY_JUDGE_KEY"]) == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["score"] == pytest.approx((0.8 + 0.3 + 1.0) / 3 * 100)
    # MM-Vet's per-capability mean over the questions that need it: v1_0 ocr+math, v1_1 rec, v1_2 ocr
    assert m["capabilities"] == pytest.approx({"math": 80.0, "ocr": 90.0, "rec": 30.0})
    assert m["capability_integrations"] == pytest.approx({"math_ocr": 80.0, "ocr": 100.0, "rec": 30.0})
    assert m["judge"]["model"] == "grader-1" and m["judge"]["prompt"] == PROMPT_NAME
    assert m["comparable_to_published"] is False and "not comparable" in m["judge"]["note"]
    assert len(judge.requests) == 3
    request = judge.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "grader-1" and request["body"]["temperature"] == 0
    content = request["body"]["messages"][0]["content"]
    assert "What is x?" in content and "5  <OR>  five" in content and "x is five" in content


def test_a_user_prompt_file_and_mmvet_style_rows(tmp_path, fake_judge):
    judge = fake_judge(lambda content: "1.0")
    samples = get_benchmark("mmvet").load(mmvet_data(tmp_path))
    template = write(tmp_path / "prompt.txt", "Grade it.\nQ={question} R={answer} P={prediction}\n")
    m = get_benchmark("mmvet", judge=load_judge(judge.url, "g", template)).score(samples, {"v1_0": "five"})
    assert judge.requests[0]["body"]["messages"][0]["content"] == "Grade it.\nQ=What is x? R=5  <OR>  five P=five\n"
    assert m["judge"]["prompt"].startswith("file:prompt.txt sha256:") and m["comparable_to_published"] is None
    # a prompt without placeholders gets the question row appended, as MM-Vet's evaluator builds it
    assert render_prompt("Few-shot table.\n", "Q?", "a<AND>b", "pred") == "Few-shot table.\nQ? | a <AND> b | pred | "


@pytest.mark.parametrize("reply,mark", [("0.7", 0.7), ("1", 1.0), ("0.5.", 0.5), (" 0.0 wrong", 0.0),
                                        ("1.5", None), ("-0.1", None), ("good", None), ("", None)])
def test_parse_mark(reply, mark):
    assert parse_mark(reply) == mark


def test_judge_failures_are_one_line_errors(tmp_path, fake_judge, monkeypatch):
    samples = get_benchmark("mmvet").load(mmvet_data(tmp_path))
    chatty = fake_judge(lambda content: "I think it is right")
    with pytest.raises(MatvlmError, match=r"gave no mark in \[0, 1\] in 3 tries .*'I think it is right'"):
        get_benchmark("mmvet", judge=load_judge(chatty.url, "g")).score(samples, {})
    assert [r["body"]["temperature"] for r in chatty.requests] == [0.0, 0.5, 1.0]   # asked again, hotter
    broken = fake_judge(lambda content: None)
    with pytest.raises(MatvlmError, match=r"answered HTTP 500: boom"):
        get_benchmark("mmvet", judge=load_judge(broken.url, "g")).score(samples, {})
    with pytest.raises(MatvlmError, match=r"unreachable"):
        load_judge("http://127.0.0.1:9/v1", "g", timeout=5)("q", "a", "p")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(MatvlmError, match=r"environment variable NO_SUCH_KEY"):
        load_judge(chatty.url, "g", api_key_env="NO_SUCH_KEY")
    with pytest.raises(MatvlmError, match=r"must start with http"):
        load_judge("127.0.0.1:8000", "g")


def test_judge_flags_are_checked_before_scoring(tmp_path, capsys):
    data = mmvet_data(tmp_path)
    assert main(["eval", "--benchmark", "mmvet", "--data", str(data), "--judge-url", "http://127.0.0.1:1/v1"]) == 2
    assert "needs both --judge-url and --judge-model" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "pope", "--data", str(data), "--judge-url", "http://x/v1",
                 "--judge-model", "m"]) == 2
    assert "grades MM-Vet only" in capsys.readouterr().err
