"""Train proxykern's shipped proxy-tuning trio on a synthetic world (see world.py).

Makes, in --out (default: examples/trio/models):
  tokenizer/    a word-level HF tokenizer over the world's words
  base/         the *large* model, pretrained on the fact corpus
  anti_expert/  the *small* model, pretrained on the same corpus (the untuned twin)
  expert/       the small model tuned on the question/answer task (half of the people)
  tuned_base/   the large model tuned on the same task: the upper reference
all LlamaForCausalLM, saved with save_pretrained (safetensors), plus world.json (the seed and
sizes, so evaluate.py rebuilds the same held-out items).

    python examples/trio/make_trio.py               # the shipped settings (CPU, minutes)
    python examples/trio/make_trio.py --quick       # a smoke run with tiny settings
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT_TEMPLATE = "{% for m in messages %}question : {{ m['content'] }} answer :{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(world.SPECIAL_TOKENS + world.all_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, hidden: int, layers: int, heads: int, tok) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config)


def corpus_batches(tok, sentences, batch_size, block, rng):
    """Random windows of consecutive corpus sentences, packed into (batch, block) ids."""
    ids = []
    for s in sentences:
        ids.extend(tok.encode(s, add_special_tokens=False))
    data = torch.tensor(ids)
    starts = list(range(0, len(ids) - block - 1, block // 2))
    rng.shuffle(starts)
    for i in range(0, len(starts) - batch_size + 1, batch_size):
        rows = torch.stack([data[s:s + block] for s in starts[i:i + batch_size]])
        yield rows, rows.clone()


def task_batches(tok, items, batch_size, rng):
    """Prompt + target + <eos>, left-padded; the loss is on the target only."""
    items = list(items)
    rng.shuffle(items)
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        seqs, labels = [], []
        for it in chunk:
            p = tok.encode(it.prompt, add_special_tokens=False)
            t = tok.encode(it.target, add_special_tokens=False) + [tok.eos_token_id]
            seqs.append(p + t)
            labels.append([-100] * len(p) + t)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        lab = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (s, l) in enumerate(zip(seqs, labels)):
            ids[r, width - len(s):] = torch.tensor(s)
            lab[r, width - len(s):] = torch.tensor(l)
            mask[r, width - len(s):] = 1
        yield ids, lab, mask


def train(model, batches_fn, epochs, lr, label, log_every=50):
    """AdamW with linear warm-up and cosine decay over ``epochs`` passes of ``batches_fn``."""
    total = epochs * sum(1 for _ in batches_fn(random.Random(0)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    model.train()
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        for batch in batches_fn(random.Random(1000 + epoch)):
            if len(batch) == 2:
                ids, labels = batch
                out = model(input_ids=ids, labels=labels)
            else:
                ids, labels, mask = batch
                pos = (mask.cumsum(1) - 1).clamp(min=0)
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % log_every == 0:
                print(f"  [{label}] epoch {epoch} step {step}/{total} loss {out.loss.item():.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
            step += 1
    model.eval()
    return time.time() - t0


def write_heldout(out_dir: str, items) -> None:
    """heldout.json: the held-out task items and each attribute's values, for scoring
    answers without this folder's code (``proxykern demo`` and the tests read it)."""
    data = dict(items=[dict(prompt=it.prompt, attribute=it.attribute, answer=it.answer)
                       for it in items],
                values={attr: spec[0] for attr, spec in world.ATTRIBUTES.items()})
    with open(os.path.join(out_dir, "heldout.json"), "w") as f:
        json.dump(data, f, indent=1)


SETTINGS = {
    "full": dict(people=400, large=(128, 4, 4), small=(32, 1, 2), pre_epochs_large=60,
                 pre_epochs_small=60, tune_epochs=6, batch=32, block=48),
    "quick": dict(people=60, large=(64, 2, 2), small=(16, 1, 2), pre_epochs_large=4,
                  pre_epochs_small=4, tune_epochs=2, batch=16, block=32),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    people = world.make_people(cfg["people"], args.seed)
    sentences = world.corpus_sentences(people, args.seed)
    qa_train, qa_heldout = world.qa_split(people, args.seed)
    tok = build_tokenizer()
    V = len(tok)
    print(f"world: {len(people)} people, {len(sentences)} corpus sentences, "
          f"{len(qa_train)} tuning / {len(qa_heldout)} held-out task items, vocab {V}")

    def corpus(rng):
        return corpus_batches(tok, sentences, cfg["batch"], cfg["block"], rng)

    def task(rng):
        return task_batches(tok, qa_train, cfg["batch"], rng)

    times = {}
    large = make_model(V, *cfg["large"], tok)
    small = make_model(V, *cfg["small"], tok)
    times["pretrain_base"] = train(large, corpus, cfg["pre_epochs_large"], 3e-3, "base")
    times["pretrain_small"] = train(small, corpus, cfg["pre_epochs_small"], 3e-3, "small")

    os.makedirs(args.out, exist_ok=True)
    def save(model, name):  # each model folder also loads its tokenizer, as on a hub
        model.save_pretrained(os.path.join(args.out, name))
        tok.save_pretrained(os.path.join(args.out, name))

    tok.save_pretrained(os.path.join(args.out, "tokenizer"))
    save(large, "base")
    save(small, "anti_expert")
    # Tune copies: the pretrained models stay as base / anti-expert.
    times["tune_expert"] = train(small, task, cfg["tune_epochs"], 1e-3, "expert")
    save(small, "expert")
    times["tune_base"] = train(large, task, cfg["tune_epochs"], 1e-3, "tuned_base")
    save(large, "tuned_base")

    write_heldout(args.out, qa_heldout)
    meta = dict(seed=args.seed, settings=cfg, vocab=V, training_seconds=times,
                threads=torch.get_num_threads(), device="cpu",
                params={"base": sum(p.numel() for p in large.parameters()),
                        "expert": sum(p.numel() for p in small.parameters())})
    with open(os.path.join(args.out, "world.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
