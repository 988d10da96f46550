"""BIG-bench multiple-choice scoring of sglang_sawint4.eval.tasks."""

import json

import pytest
import torch
from helpers import tiny_llama

from sglang_sawint4.eval import tasks as eval_tasks


class CharTokenizer:
    """ids = byte values + 1 (0 is padding)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 1 for b in text.encode()][:60]}


def test_task_format_and_answer_index(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "toy", "examples": [
        {"input": "2+2?", "target_scores": {"3": 0, "4": 1, "5": 0}},
        {"input": "no options", "target": "x"},
    ]}))
    name, items = eval_tasks.load_task(str(path), 10, seed=0)
    assert name == "toy" and len(items) == 1
    prompt, options, best = items[0]
    assert prompt == "\nQ: 2+2?\nA:" and options == ["3", "4", "5"] and best == 1


def test_padded_batch_scores_equal_one_by_one():
    model = tiny_llama(vocab_size=257, hidden_size=64, head_dim=32)
    tok = CharTokenizer()
    prompt, options = "\nQ: which?\nA:", ["a", "bbbb", "cc"]
    batched = eval_tasks.score_options(model, tok, prompt, options)
    for option, score in zip(options, batched):
        alone = eval_tasks.score_options(model, tok, prompt, [option])[0]
        assert score == pytest.approx(alone, abs=1e-4)
    ids = tok(prompt + " a")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    n = len(tok(prompt)["input_ids"])
    direct = sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids)))
    assert batched[0] == pytest.approx(direct, abs=1e-4)


class FullCharTokenizer(CharTokenizer):
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 1 for b in text.encode()]}


@pytest.mark.parametrize("depth", [0.05, 0.5, 0.95])
def test_passkey_prompt_fits_and_places_the_needle(depth):
    from sglang_sawint4.eval import passkey as eval_passkey

    tok = FullCharTokenizer()
    prompt, answer = eval_passkey.passkey_sample(tok, 3000, depth, 12345)
    assert len(prompt) + len(answer) <= 3000 and len(prompt) + len(answer) > 3000 - 2 * len(eval_passkey.FILLER)
    text = bytes(i - 1 for i in prompt).decode()
    assert text.startswith(eval_passkey.INSTRUCTION) and text.endswith(eval_passkey.QUESTION)
    assert bytes(i - 1 for i in answer).decode() == " 12345."
    needle = eval_passkey.NEEDLE.format(key=12345)
    filler_chars = len(text) - len(eval_passkey.INSTRUCTION) - len(needle) - len(eval_passkey.QUESTION)
    at = (text.index(needle) - len(eval_passkey.INSTRUCTION)) / filler_chars  # depth within the filler
    assert abs(at - depth) < 0.02
    with pytest.raises(SystemExit):
        eval_passkey.passkey_sample(tok, 300, depth, 12345)


def test_passkey_counts_only_an_exact_greedy_answer():
    from sglang_sawint4.eval import passkey as eval_passkey

    class Echo(torch.nn.Module):
        """Predicts token t+1 = the given sequence's token t+1, except at position `wrong`."""

        device = torch.device("cpu")  # as a transformers model has

        def __init__(self, wrong=None):
            super().__init__()
            self.wrong = wrong

        def forward(self, ids, logits_to_keep=0):
            logits = torch.nn.functional.one_hot(ids.roll(-1, dims=1), 300).float()
            if self.wrong is not None:
                logits[0, self.wrong] = torch.nn.functional.one_hot(torch.tensor(7), 300).float()
            return type("Out", (), {"logits": logits[:, -logits_to_keep:]})  # transformers: 0 keeps all

    prompt, answer = [5, 6, 7, 8], [50, 51, 52]
    assert eval_passkey.retrieved(Echo(), prompt, answer)
    assert not eval_passkey.retrieved(Echo(wrong=3), prompt, answer)  # first answer token wrong
    assert not eval_passkey.retrieved(Echo(wrong=5), prompt, answer)  # last answer token wrong
    assert eval_passkey.retrieved(Echo(wrong=2), prompt, answer)  # inside the prompt: not scored
    assert eval_passkey.retrieved(Echo(wrong=6), prompt, answer)  # after the answer: not scored


@pytest.mark.parametrize("text,expected", [
    ("12 + 30 = 42 apples\nAnswer: 1,234", 1234.0),  # the number after the last 'Answer:'
    ("first 5, then 12", 12.0),  # no 'Answer:': the last number
    ("Answer: 3\nwait, recount\nAnswer: -4.5 units", -4.5),
    ("Answer: none, but 7 was close", 7.0),
    ("no digits at all", None),
])
def test_gsm_answer_extraction(text, expected):
    from sglang_sawint4.eval import gsm as eval_gsm

    assert eval_gsm.extract_answer(text) == expected
    assert eval_gsm.is_correct(text, "1234") == (expected == 1234.0)
