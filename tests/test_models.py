import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from covrl.models import char_tokenizer, save_tiny_model, tiny_causal_lm


def test_char_tokenizer_roundtrip_and_chat_template():
    tok = char_tokenizer()
    text = "12+7=19\nok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                  add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_tiny_model_is_deterministic_and_reloads(tmp_path):
    a, b = tiny_causal_lm(seed=3), tiny_causal_lm(seed=3)
    x = torch.randint(4, 50, (2, 9))
    torch.testing.assert_close(a(x).logits, b(x).logits)
    path = save_tiny_model(tmp_path / "m", seed=3)
    m = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(m(x).logits, a(x).logits)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok("a=1", add_special_tokens=False)["input_ids"]) == "a=1"
