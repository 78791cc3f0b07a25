"""The REST API with FastAPI's TestClient and tiny random components: every endpoint, batching,
the queue bound, timeouts, authentication and every class of bad input."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image
from serve_helpers import decode, noise_image, png, tiny_pipe

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from latentdit import edit  # noqa: E402
from latentdit.serve.app import create_app  # noqa: E402
from latentdit.serve.schemas import Limits  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_clip, tiny_vae):
    return tiny_pipe(tiny_clip, tiny_vae)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, name="tiny")) as c:
        yield c


def _block(app) -> threading.Event:
    """Occupy the worker until the returned event is set."""
    release, started = threading.Event(), threading.Event()
    app.state.serve.batcher.start()
    app.state.serve.batcher.submit(None, lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


def _arr(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


# -------------------------------------------------------------------------------- endpoints
def test_health_and_model_info_report_the_model_and_its_limits(client):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["conditioning"] == "text" and info["default_size"] == [16, 16]
    assert info["limits"]["side_step"] == 4 and info["limits"]["max_side"] == 64  # downsample 2 x patch 2
    assert info["sampling"]["steps"] == 4 and "dpmpp_2m" in info["samplers"]
    assert info["sampling"]["count_contrast"] == 0.0  # the tiny model's config: off
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/generate", "/v1/img2img", "/v1/inpaint",
                                                                  "/v1/interpolate", "/v1/model", "/healthz"}
    assert "<canvas" in client.get("/ui").text


def test_generate_returns_pngs_with_their_seeds_and_a_seed_redraws_its_image(client, pipe):
    out = client.post("/v1/generate", json={"prompt": "a red circle", "num_images": 3, "seed": 7}).json()
    assert out["seeds"] == [7, 8, 9] and len(out["images"]) == 3
    images = [decode(b) for b in out["images"]]
    assert all(im.format == "PNG" and im.size == (16, 16) for im in images)
    again = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 8}).json()
    assert np.array_equal(_arr(decode(again["images"][0])), _arr(images[1]))
    direct = pipe("a red circle", seed=9, progress=False)[0]
    assert np.array_equal(_arr(images[2]), _arr(direct))  # the server adds nothing to the pipeline
    assert not np.array_equal(_arr(images[0]), _arr(images[1]))


def test_generate_without_a_seed_draws_a_random_one_and_reports_it(client):
    a = client.post("/v1/generate", json={"prompt": "a red circle"}).json()
    b = client.post("/v1/generate", json={"prompt": "a red circle"}).json()
    assert a["seeds"] != b["seeds"]
    redo = client.post("/v1/generate", json={"prompt": "a red circle", "seed": a["seeds"][0]}).json()
    assert redo["images"] == a["images"]


def test_generate_settings_reach_the_pipeline(client):
    base = {"prompt": "a red circle", "seed": 1}
    ref = client.post("/v1/generate", json=base).json()
    assert (ref["steps"], ref["sampler"], ref["guidance_scale"]) == (4, "dpmpp_2m", 4.5)
    for change in ({"steps": 2}, {"sampler": "euler"}, {"guidance_scale": 1.0}, {"negative_prompt": "blue"},
                   {"guidance_interval": [0.5, 1.0]}):
        out = client.post("/v1/generate", json=base | change).json()
        assert out["images"] != ref["images"], change
    wide = client.post("/v1/generate", json=base | {"width": 32, "height": 8}).json()
    assert decode(wide["images"][0]).size == (32, 8)


def test_accept_png_returns_one_image(client):
    r = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 3}, headers={"Accept": "image/png"})
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "3"
    assert Image.open(__import__("io").BytesIO(r.content)).size == (16, 16)
    r = client.post("/v1/generate", json={"prompt": "a", "num_images": 2}, headers={"Accept": "image/png"})
    assert r.status_code == 406 and "num_images" in r.text


def test_img2img_and_inpaint_edit_an_upload(client, pipe):
    src = noise_image()
    files = {"image": ("in.png", png(src), "image/png")}
    out = client.post("/v1/img2img", files=files, data={"prompt": "a blue square", "strength": "0.5",
                                                        "seed": "2", "num_images": "2"}).json()
    assert out["seeds"] == [2, 3] and [decode(b).size for b in out["images"]] == [(16, 16)] * 2
    direct = edit.img2img(pipe, src, "a blue square", strength=0.5, seed=3)[0]
    assert np.array_equal(_arr(decode(out["images"][1])), _arr(direct))  # what the edit function draws
    other = client.post("/v1/img2img", files=files, data={"prompt": "a blue square", "strength": "0.9", "seed": "2"})
    assert other.json()["images"][0] != out["images"][0]
    mask = Image.new("L", (16, 16))
    mask.paste(255, (8, 0, 16, 16))
    out = client.post("/v1/inpaint", files=files | {"mask": ("m.png", png(mask), "image/png")},
                      data={"prompt": "a green triangle", "seed": "4"}).json()
    painted = _arr(decode(out["images"][0]))
    assert np.array_equal(painted[:, :8], _arr(src)[:, :8])  # outside the mask the input is kept exactly
    assert not np.array_equal(painted[:, 8:], _arr(src)[:, 8:])


def test_interpolate_returns_a_gif_with_the_frames_asked_for(client):
    r = client.post("/v1/interpolate", json={"prompts": ["a red circle", "a blue square"], "seeds": [0, 1],
                                             "frames": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.headers["x-seeds"] == "0,1"
    gif = Image.open(__import__("io").BytesIO(r.content))
    assert gif.n_frames == 3 and gif.size == (16, 16)
    r = client.post("/v1/interpolate", json={"prompts": ["a red circle"], "seeds": [5]})
    assert r.status_code == 422 and "seeds" in r.text


def test_class_conditional_model_takes_class_labels(tiny_vae):
    pipe = tiny_pipe(None, tiny_vae, text_dim=0, pooled_dim=0, num_classes=3)
    with TestClient(create_app(pipe)) as c:
        assert c.get("/v1/model").json()["conditioning"] == "class"
        assert c.post("/v1/generate", json={"class_label": 2}).status_code == 200
        for body, field in (({"class_label": 3}, "class_label"), ({"prompt": "a red circle"}, "class_label")):
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field


# -------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])  # ddpm: each image's added noise is its own seed's
def test_concurrent_requests_run_as_one_pipeline_call_and_keep_their_images(pipe, sampler):
    app = create_app(pipe, max_wait=0.5, max_batch=16)
    calls = []
    original = pipe.__class__.__call__

    def counting(self, prompts, **kw):
        calls.append(len(prompts))
        return original(self, prompts, **kw)

    prompts = ["a red circle", "two blue hearts at the bottom", "a star", "a small green cross on black"]
    results = {}
    with TestClient(app) as c, pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipe.__class__, "__call__", counting)

        def post(i):
            results[i] = c.post("/v1/generate", json={"prompt": prompts[i], "seed": 10 * i, "num_images": 2,
                                                      "sampler": sampler}).json()

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        other = c.post("/v1/generate", json={"prompt": "a star", "steps": 2}).json()  # other settings: alone
    assert calls[0] == 8 and {results[i]["batch_size"] for i in range(4)} == {8}
    assert other["batch_size"] == 1
    for i in range(4):  # each image is the one its seed draws alone (tokens padded further are masked out)
        alone = pipe([prompts[i]] * 2, seed=[10 * i, 10 * i + 1], sampler=sampler, progress=False)
        got = [_arr(decode(b)) for b in results[i]["images"]]
        assert results[i]["seeds"] == [10 * i, 10 * i + 1]
        assert all(np.abs(g - _arr(a)).max() <= 2 for g, a in zip(got, alone)), i


def test_a_full_queue_answers_429_with_retry_after_and_recovers(pipe):
    app = create_app(pipe, max_queue=1)
    with TestClient(app) as c:
        release = _block(app)
        app.state.serve.batcher.submit(None, lambda: None)  # the one queue slot
        r = c.post("/v1/generate", json={"prompt": "a red circle"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        release.set()
        time.sleep(0.2)
        assert c.post("/v1/generate", json={"prompt": "a red circle"}).status_code == 200


def test_a_request_past_its_timeout_gets_503_and_its_job_is_dropped(pipe):
    app = create_app(pipe, timeout=0.3)
    with TestClient(app) as c:
        release = _block(app)
        r = c.post("/v1/generate", json={"prompt": "a red circle"})
        assert r.status_code == 503 and "within" in r.json()["detail"]
        b = app.state.serve.batcher
        assert b.queued() == 0 and b.stats.cancelled == 1
        release.set()


# -------------------------------------------------------------------------------- bad input
BAD_JSON = [
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"prompt": "x" * 501}, "prompt"),
    ({"prompt": 3}, "prompt"), ({}, "body"), ({"prompt": "a", "class_label": 1}, "body"),
    ({"prompt": "a", "steps": 0}, "steps"), ({"prompt": "a", "steps": 10_000}, "steps"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": "x"}, "guidance_scale"),
    ({"prompt": "a", "width": 100_000}, "width"), ({"prompt": "a", "height": 100_000}, "height"),
    ({"prompt": "a", "width": 18}, "width"), ({"prompt": "a", "height": 0}, "height"),
    ({"prompt": "a", "width": 68}, "width"),  # a multiple of 4 past the model's 64
    ({"prompt": "a", "num_images": 0}, "num_images"), ({"prompt": "a", "num_images": 9}, "num_images"),
    ({"prompt": "a", "seed": -1}, "seed"), ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "sampler": "plms"}, "sampler"), ({"prompt": "a", "guidance_interval": [0.9, 0.1]},
                                                      "guidance_interval"),
    ({"prompt": "a", "negative_prompt": ""}, "negative_prompt"), ({"prompt": "a", "nsfw": True}, "nsfw"),
]


@pytest.mark.parametrize("body,field", BAD_JSON, ids=lambda v: str(v)[:40])
def test_bad_generate_bodies_get_422_naming_the_field(client, body, field):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert field in {str(p) for d in r.json()["detail"] for p in d["loc"]}, r.json()


@pytest.mark.parametrize("raw", [b'{"prompt": "a", "guidance_scale": NaN}', b'{"prompt": "a", "steps": Infinity}',
                                 b'{"prompt": "a", "guidance_scale": 1e999}', b"not json", b"[1, 2]", b""])
def test_malformed_json_is_422_never_500(client, raw):
    r = client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def _upload(client, path="/v1/img2img", image=None, mask=None, **data):
    files = {"image": ("in.png", png(noise_image()) if image is None else image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return client.post(path, files=files, data={"prompt": "a red circle", **data})


def _bomb() -> bytes:
    """A 6000x6000 PNG: ~100 KB on disk, 108 MB decoded."""
    return png(Image.new("L", (6000, 6000)))


@pytest.mark.parametrize("case,field", [
    (dict(image=b"not an image"), "image"), (dict(image=b""), "image"), (dict(image=png(noise_image())[:60]), "image"),
    (dict(image=_bomb()), "image"), (dict(image=png(noise_image(18))), "image"),
    (dict(strength="1.5"), "strength"), (dict(strength="nan"), "strength"), (dict(steps="0"), "steps"),
    (dict(prompt=""), "prompt"), (dict(extra="1"), "extra"),
])
def test_bad_img2img_uploads_get_422_naming_the_field(client, case, field):
    r = _upload(client, **case)
    assert r.status_code == 422, r.text
    assert field in {str(p) for d in r.json()["detail"] for p in d["loc"]}, r.json()


@pytest.mark.parametrize("mask,field", [(png(Image.new("L", (8, 16), 255)), "mask"),
                                        (png(Image.new("L", (16, 16), 0)), "mask"), (b"junk", "mask")])
def test_bad_masks_get_422(client, mask, field):
    r = _upload(client, "/v1/inpaint", mask=mask)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text


def test_an_oversized_body_is_refused_with_413_declared_or_streamed(pipe):
    app = create_app(pipe, limits=Limits(max_side=64, side_step=4, max_body_bytes=10_000))
    with TestClient(app) as c:
        r = c.post("/v1/img2img", files={"image": ("a.png", b"\0" * 20_000, "image/png")}, data={"prompt": "a"})
        assert r.status_code == 413

        def chunks():
            for _ in range(30):
                yield b"x" * 1000

        r = c.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/generate", json={"prompt": "still fine"}).status_code == 200


def test_the_worker_survives_a_failing_job_and_a_failing_batch_member(pipe, monkeypatch):
    app = create_app(pipe, max_wait=0.3)
    original = pipe.__class__.__call__

    def picky(self, prompts, **kw):
        if "boom" in prompts:
            raise ValueError("prompt 'boom' is not allowed")
        return original(self, prompts, **kw)

    monkeypatch.setattr(pipe.__class__, "__call__", picky)
    with TestClient(app) as c:
        out = {}

        def post(p):
            out[p] = c.post("/v1/generate", json={"prompt": p})

        threads = [threading.Thread(target=post, args=(p,)) for p in ("boom", "fine", "also fine")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert out["boom"].status_code == 422 and "boom" in out["boom"].text
        assert out["fine"].status_code == 200 and out["also fine"].status_code == 200


# -------------------------------------------------------------------------------- security
def test_token_guards_the_api_not_the_health_check(pipe):
    with TestClient(create_app(pipe, token="s3cret")) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/model").status_code == 401
        assert c.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/model", headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert c.post("/v1/generate", json={"prompt": "a"}).status_code == 401
        ok = c.post("/v1/generate", json={"prompt": "a"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_binding_beyond_loopback_without_a_token_warns(monkeypatch, capsys, pipe):
    import latentdit.serve.server as server

    ran = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: ran.update(kw, app=app))
    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    server.serve(host="0.0.0.0", port=0, pipe=pipe)
    assert "without a token" in capsys.readouterr().err and ran["host"] == "0.0.0.0"
    monkeypatch.setenv(server.TOKEN_ENV, "t")
    server.serve(host="0.0.0.0", port=0, pipe=pipe)
    assert "without a token" not in capsys.readouterr().err
    assert ran["app"].state.serve.token == "t"
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and not server.is_loopback("0.0.0.0")
