"""Chinese captions of `shapes` scenes.

Each Chinese template stands at the same index as the English template that states the same
facts (`_captions._TEMPLATES`), so a scene drawn once has an English and a Chinese caption that
hold a generated image to the same checks, and `--lang zh` evaluates the same scenes as English.
"""

from __future__ import annotations

import random

from ._vocab import INVERSE_RELATION

COLORS_ZH = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "cyan": "青色",
             "blue": "蓝色", "purple": "紫色", "pink": "粉色", "white": "白色", "black": "黑色"}
BACKGROUNDS_ZH = {"white": "白色", "black": "黑色", "gray": "灰色"}
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形",
             "heart": "心形"}
SIZE_WORDS_ZH = {"small": ("小的", "小小的"), "large": ("大的", "很大的")}
POSITION_PHRASES_ZH = {
    "top left": ("左上角", "左上方"), "top": ("上方中间", "顶部中间", "正上方"),
    "top right": ("右上角", "右上方"), "left": ("左侧", "左边"), "center": ("中间", "中央", "正中间"),
    "right": ("右侧", "右边"), "bottom left": ("左下角", "左下方"), "bottom": ("下方中间", "底部中间", "正下方"),
    "bottom right": ("右下角", "右下方"),
}
RELATION_PHRASES_ZH = {"left of": ("左边", "左侧"), "right of": ("右边", "右侧"), "above": ("上方", "上面"),
                       "below": ("下方", "下面")}
NUMBERS_ZH = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五", 6: "六", 7: "七", 8: "八", 9: "九"}

# index i states what the English template i states
TEMPLATES_ZH: dict[str, tuple[str, ...]] = {
    "single": (
        "{pos}有{a_sized}",
        "{a_obj}在{pos}",
        "{a_sized}",
        "{a_obj}",
        "{bg}背景上的{a_obj}",
        "{bg}背景上，{pos}有{a_sized}",
        "在{pos}，{a_sized}",
        "{bg}背景，{pos}有{a_obj}",
        "一张图片：{pos}有{a_sized}",
    ),
    "relation": (
        "{a_A}在{a_B}的{rel}",
        "{a_B}在{a_A}的{inv}",
        "{a_B}，{a_A}在它的{rel}",
        "{a_sA}在{a_sB}的{rel}",
        "{bg}背景上，{a_A}在{a_B}的{rel}",
        "两个图形：{a_A}在{a_B}的{rel}",
        "在{bg}背景上，{a_sA}在{a_sB}的{rel}",
    ),
    "count": (
        "{num}个{color}的{shape}",
        "{num}个{size}{color}{shape}",
        "{digit}个{color}{shape}",
        "{bg}背景上有{num}个{color}的{shape}",
        "一组{num}个{color}的{shape}",
        "正好{num}个{color}的{shape}",
        "{bg}背景上有{num}个{size}{color}{shape}",
        "{num}个一模一样的{color}{shape}",
    ),
}


def _noun(obj: dict, rng: random.Random, sized: bool) -> str:
    if sized:
        return "一个" + rng.choice(SIZE_WORDS_ZH[obj["size"]]) + COLORS_ZH[obj["color"]] + SHAPES_ZH[obj["shape"]]
    return "一个" + COLORS_ZH[obj["color"]] + rng.choice(("的", "")) + SHAPES_ZH[obj["shape"]]


def _fields(scene: str, attributes: dict, rng: random.Random) -> dict[str, str]:
    objects = attributes["objects"]
    fields: dict[str, str] = {}
    if attributes.get("background"):
        fields["bg"] = BACKGROUNDS_ZH[attributes["background"]]
    if scene == "single":
        obj = objects[0]
        fields["a_obj"] = _noun(obj, rng, False)
        if "size" in obj:
            fields["a_sized"] = _noun(obj, rng, True)
        if "cell" in obj:
            fields["pos"] = rng.choice(POSITION_PHRASES_ZH[obj["cell"]])
    elif scene == "relation":
        a, b = objects[:2]
        relation = attributes["relation"]
        fields |= {"a_A": _noun(a, rng, False), "a_B": _noun(b, rng, False),
                   "rel": rng.choice(RELATION_PHRASES_ZH[relation]),
                   "inv": rng.choice(RELATION_PHRASES_ZH[INVERSE_RELATION[relation]])}
        if "size" in a and "size" in b:
            fields |= {"a_sA": _noun(a, rng, True), "a_sB": _noun(b, rng, True)}
    else:
        n = attributes.get("count", len(objects))
        fields |= {"num": NUMBERS_ZH.get(n, str(n)), "digit": str(n), "color": COLORS_ZH[objects[0]["color"]],
                   "shape": SHAPES_ZH[objects[0]["shape"]]}
        if "size" in objects[0]:
            fields["size"] = rng.choice(SIZE_WORDS_ZH[objects[0]["size"]])
    return fields


def caption_zh(scene: str, index: int, attributes: dict, rng: random.Random) -> str:
    """The Chinese counterpart of English template `index` for this scene."""
    return TEMPLATES_ZH[scene][index].format(**_fields(scene, attributes, rng))
