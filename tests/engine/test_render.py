"""The renderer: exactly which tokens are trained on."""

from transformers import AutoTokenizer

from finetune_studio.engine.datasets.render import IGNORE, tokenize_conversation, tokenize_pair
from finetune_studio.engine.datasets.schema import Conversation, Message, PreferencePair


def _trained_text(tok, t):
    return tok.decode([i for i, label in zip(t.input_ids, t.labels) if label != IGNORE])


def test_only_assistant_turns_and_their_end_token_are_trained(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    conv = Conversation(
        (
            Message("system", "Be brief."),
            Message("user", "2+2?"),
            Message("assistant", "4"),
            Message("user", "3+3?"),
            Message("assistant", "6 of course"),
        )
    )
    t = tokenize_conversation(tok, conv, 512)
    assert _trained_text(tok, t) == "4<|im_end|>\n6 of course<|im_end|>\n"
    every = tokenize_conversation(tok, conv, 512, loss_on="all")
    assert every.labels == every.input_ids


def test_first_turn_assistant_trains_its_content_not_the_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = tokenize_conversation(tok, Conversation((Message("assistant", "Hello there"),)), 512)
    assert _trained_text(tok, t).startswith("Hello there") and "assistant" not in _trained_text(tok, t)


def test_pair_sides_keep_the_same_prompt_when_one_answer_is_long(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = (Message("user", "the quick brown fox jumps over the lazy dog " * 4),)
    pair = PreferencePair(prompt, (Message("assistant", "Paris " * 30),), (Message("assistant", "no"),))
    tp = tokenize_pair(tok, pair, 64)
    n_chosen = sum(1 for x in tp.chosen.labels if x == IGNORE)
    n_rejected = sum(1 for x in tp.rejected.labels if x == IGNORE)
    assert n_chosen == n_rejected < tp.prompt_tokens
    assert tp.chosen.input_ids[:n_chosen] == tp.rejected.input_ids[:n_rejected]
    assert len(tp.chosen.input_ids) <= 64 and tp.chosen.truncated and not tp.difference_truncated


def test_difference_cut_off_by_max_length_is_flagged(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    same_start = "The answer is " * 20
    pair = PreferencePair(
        (Message("user", "q"),), (Message("assistant", same_start + "yes"),), (Message("assistant", same_start + "no"),)
    )
    assert tokenize_pair(tok, pair, 32).difference_truncated
