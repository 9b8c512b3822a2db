"""The `leanlm` command: generate streams text and speed, chat keeps history, bad flags fail clearly."""
import io

from leanlm.cli import main


def test_generate_streams_text_and_prints_speed(tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    assert main(["generate", "hello world", "--model", model, "--max-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("hello world") and len(out.out) > len("hello world\n")
    assert "generation: 5 tokens at" in out.err and "prompt:" in out.err


def test_chat_keeps_history(tiny_model_dir, capsys, monkeypatch):
    from leanlm.engine.engine import LLM

    seen = []
    original = LLM.stream

    def spy(self, prompt, params=None):
        seen.append(list(prompt))
        return original(self, prompt, params)

    monkeypatch.setattr(LLM, "stream", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nthe fox\n/exit\n"))
    assert main(["chat", "--model", str(tiny_model_dir("llama")), "--max-tokens", "3"]) == 0
    assert len(seen) == 2 and seen[1][: len(seen[0])] == seen[0]  # turn 2 extends turn 1's prompt
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_models_lists_the_embedded_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "LlamaForCausalLM" in out


def test_bad_flags_fail_with_a_clear_message(tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    assert main(["generate", "hi", "--model", model, "--dtype", "int3"]) == 2
    assert "dtype 'int3'" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", model, "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
