import pytest

from latentdit.cli import main, read_prompt_file
from latentdit.cli_train import parse_overrides


def test_read_prompt_file_jsonl_and_text(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "x", "seed": 4}\n\n{"prompt": "y"}\n')
    assert read_prompt_file(str(f)) == [{"id": "a", "prompt": "x", "seed": 4}, {"id": "3", "prompt": "y"}]
    f.write_text("first\n\nthird\n")
    assert [it["id"] for it in read_prompt_file(str(f))] == ["1", "3"]


@pytest.mark.parametrize("text,match", [
    ('{"id": "../evil", "prompt": "x"}\n', "cannot be used as a file name"),
    ('{"prompt": 3}\n', "no string 'prompt'"),
    ("{broken\n", "not valid JSON"),
    ("\n\n", "holds no prompts"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "id 'a' repeats line 1"),
    ('{"prompt": "x", "seed": null}\n', "'seed' must be an integer"),
    ('{"prompt": "x", "seed": "abc"}\n', "'seed' must be an integer"),
])
def test_read_prompt_file_rejects(tmp_path, text, match):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_prompt_file(str(f))


def test_parse_overrides():
    assert parse_overrides(["--optim.lr", "1e-4", "--steps=10", "--model.mlp", "gelu",
                            "--preview_prompts", '["a", "b"]']) == {
        "optim": {"lr": 1e-4}, "steps": 10, "model": {"mlp": "gelu"}, "preview_prompts": ["a", "b"]}
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--steps"])
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["steps"])


def test_generate_needs_exactly_one_prompt_source(capsys):
    assert main(["generate"]) == 2
    assert "either a prompt or --from-file" in capsys.readouterr().err


def test_unknown_flags_rejected_for_strict_commands():
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus", "1"])
    assert e.value.code == 2


def test_info_prints_counts(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "0.194" in out


def test_help_and_argument_errors_do_not_load_torch():
    """Every subcommand's flags are built without torch (train and train-ae read their configs
    from train_config), so `latentdit --help` answers at once."""
    import subprocess
    import sys

    code = ("import sys\nfrom latentdit import cli\n"
            "for argv in (['--help'], ['train', '--help'], ['train-ae', '--help'], ['train', '--steps', 'x']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().endswith("torch not loaded"), r.stdout[-500:] + r.stderr[-2000:]
    assert "TrainConfig.steps expects int" in r.stderr


def test_generate_guidance_interval_flag(tmp_path, capsys):
    out = tmp_path / "g.png"
    base = ["generate", "a red circle", "--random-tiny", "--steps", "3", "--out", str(out)]
    assert main([*base, "--guidance-interval", "0.2", "1"]) == 0 and out.exists()
    assert main([*base, "--guidance-interval", "0.9", "0.1"]) == 2
    assert "guidance_interval must satisfy 0 <= lo < hi <= 1" in capsys.readouterr().err


def test_generate_refuses_a_prompt_the_encoder_cannot_read(tmp_path, capsys):
    """Chinese or emoji for an English-only encoder: one line naming the characters, no image."""
    out = tmp_path / "g.png"
    assert main(["generate", "一个红色的圆", "--random-tiny", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot read '个', '红', '色', '圆'" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (["generate", "a", "--out", "{tmp}/x.jpgg"], "cannot write images as '.jpgg'"),
    (["generate", "a", "--out", "{tmp}"], "is a folder"),
    (["generate", "a", "--out", "{tmp}/file.txt/x.png"], "cannot make its folder"),
    (["generate", "--from-file", "{tmp}/p.txt", "--out", "{tmp}/file.txt"], "with --from-file it names the folder"),
    (["interpolate", "a", "b", "--fps", "0", "--out", "{tmp}/a.gif"], "fps must be a positive number"),
    (["invert", "{tmp}/in.png", "--out", "{tmp}/inv.png"], "saved as latents, in a .safetensors file"),
    (["edit", "{tmp}/in.png", "a", "b", "--save-mask", "{tmp}/m.png"], "--save-mask writes the mask of --mask"),
    (["eval", "alignment", "--samples", "0"], "--samples must be >= 1"),
    (["eval", "alignment", "--n", "0", "--reference", "renders"], "--n must be >= 1, got 0"),
    (["eval", "alignment", "--out", "{tmp}/file.txt/rep"], "cannot make this folder"),
    (["info", "--preset", "tiny", "--height", "3"], "--height must be a positive multiple of the patch size"),
])
def test_bad_arguments_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, match):
    """Each is named in one line, before any model is loaded (so no work is lost to it)."""
    from PIL import Image

    from latentdit import cli_base, cli_edit

    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "p.txt").write_text("a red circle\n")
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")

    def no_model(*_):
        raise AssertionError("the model was loaded before the argument was checked")

    monkeypatch.setattr(cli_base, "load_pipeline", no_model)
    monkeypatch.setattr("latentdit.cli.load_pipeline", no_model)
    monkeypatch.setattr(cli_edit, "_pipeline", no_model)
    monkeypatch.setattr("latentdit.pipeline.Text2Image.from_pretrained", no_model)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_outputs_without_a_suffix_are_written_as_png(tmp_path, capsys):
    assert main(["generate", "a red circle", "--random-tiny", "--steps", "1", "--out", str(tmp_path / "pic")]) == 0
    assert (tmp_path / "pic.png").exists() and capsys.readouterr().out.strip().endswith("pic.png")


def test_from_file_images_do_not_depend_on_batching(tmp_path):
    """Each prompt of a file keeps its seeds (seed + 1000 * line + k, or its own "seed") however
    the file is batched, so a rerun with another --batch-size redraws the same images."""
    import numpy as np
    from PIL import Image

    from latentdit.plan import prompt_seeds

    assert prompt_seeds(5, 2, 3) == [2005, 2006, 2007]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n'
                       '{"prompt": "a green star", "seed": 7}\n')
    outs = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        assert main(["generate", "--from-file", str(prompts), "--random-tiny", "--steps", "2", "--fp32",
                     "--num-images", "2", "--batch-size", str(batch), "--out", str(out)]) == 0
        outs[batch] = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.glob("*.png"))}
    assert len(outs[1]) == 6 and outs[1].keys() == outs[3].keys()
    for name in outs[1]:
        assert np.abs(outs[1][name] - outs[3][name]).max() <= 2, name
    first = list(outs[1].values())
    assert np.abs(first[0] - first[1]).max() > 2  # the two images of a prompt differ (seeds + k)


def test_eval_alignment_negative_swapped_keeps_the_relation_prompts(tmp_path, capsys, monkeypatch):
    import json

    assert main(["eval", "alignment", "--reference", "renders", "--n", "30", "--out", str(tmp_path / "all")]) == 0
    for flag in ("--relation-prompts", "--negative-swapped"):
        assert main(["eval", "alignment", "--reference", "renders", "--n", "30", flag,
                     "--out", str(tmp_path / flag)]) == 0
    full, rel, neg = (json.loads((tmp_path / d / "report.json").read_text())
                      for d in ("all", "--relation-prompts", "--negative-swapped"))
    relation_ids = {r["id"] for r in full["rows"] if "relation" in r["checks"]}
    assert relation_ids and {r["id"] for r in rel["rows"]} == {r["id"] for r in neg["rows"]} == relation_ids
    # sampling gets each prompt's swapped sentence as its negative
    import latentdit.evaluate
    import latentdit.pipeline

    seen = {}
    monkeypatch.setattr(latentdit.pipeline.Text2Image, "from_pretrained", staticmethod(lambda *a, **k: None))
    monkeypatch.setattr(latentdit.evaluate, "run_alignment",
                        lambda pipe, items, **kw: seen.setdefault("items", items) and {"overall": 0.0})
    assert main(["eval", "alignment", "--n", "30", "--negative-swapped"]) == 0
    assert [it["id"] for it in seen["items"]] == [r["id"] for r in neg["rows"]]
    assert all(it["negative"] != it["prompt"] and sorted(it["negative"].split()) == sorted(it["prompt"].split())
               for it in seen["items"])
    capsys.readouterr()
    assert main(["eval", "alignment", "--reference", "renders", "--n", "4", "--lang", "zh", "--negative-swapped"]) == 2
    assert "no prompt states a relation" in capsys.readouterr().err


def test_eval_alignment_in_chinese_scores_the_same_scenes_with_chinese_prompts(tmp_path, capsys):
    import json
    import re

    for lang in ("en", "zh"):
        assert main(["eval", "alignment", "--reference", "renders", "--lang", lang, "--n", "6",
                     "--out", str(tmp_path / lang)]) == 0
    en, zh = (json.loads((tmp_path / lang / "report.json").read_text()) for lang in ("en", "zh"))
    assert [r["id"] for r in en["rows"]] == [r["id"] for r in zh["rows"]]
    assert all(re.search(r"[\u4e00-\u9fff]", r["prompt"]) for r in zh["rows"])
    assert not any(re.search(r"[\u4e00-\u9fff]", r["prompt"]) for r in en["rows"])
    assert zh["overall"] == en["overall"] == 1.0  # the same scenes, held to the same checks
    with pytest.raises(SystemExit):
        main(["eval", "alignment", "--reference", "renders", "--lang", "fr"])
