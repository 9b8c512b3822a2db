"""The embedded SmolLM2-135M-Instruct end to end: leanlm's float32 greedy generation is token for
token what transformers generates from the same checkpoint, and chat prompts tokenize the same."""
import pytest
import torch

from leanlm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
CHATS = [
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour of the sky."}],
]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def hf_model(llm):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32).eval()
    # ignore_eos on both sides: no EOS configured (min_new_tokens would instead *suppress* EOS logits)
    model.generation_config.eos_token_id = None
    return model


def test_greedy_64_tokens_identical_to_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = PROMPTS + [llm.get_tokenizer().encode_chat(CHATS[0])]
    outs = llm.generate(prompts, params)
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                    do_sample=False, pad_token_id=2)
        assert ref.shape[1] == ids.shape[1] + 64
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist(), out.prompt


def test_chat_template_ids_match_transformers_gguf_tokenizer(llm):
    import transformers as tf

    from leanlm.models.embedded import embedded_gguf_path

    gguf = embedded_gguf_path()
    ref = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = llm.get_tokenizer()
    for msgs in CHATS:
        expected = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert tok.encode_chat(msgs) == list(expected)
    # the model's default system prompt is applied when none is given
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(CHATS[0])
    for text in PROMPTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=True)


def test_chat_reply_ends_at_end_of_turn(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=48))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] == llm.get_tokenizer().tok.token_to_id("<|im_end|>")
    assert "Paris" in out.text and "<|im_end|>" not in out.text
