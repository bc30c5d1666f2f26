#!/usr/bin/env python3
"""Parity checks of the `pfe` runtime against onnxruntime and timm ("Done when").

    cargo build --release --bin pfe
    python3 scripts/check_parity.py [--pfe target/release/pfe] [--work-dir target/parity]

Without --models it builds its own models in --work-dir: synthetic weights
(`pfe synth`, or --weights for a real timm state dict), our exporter's ONNX
(`pfe export`), and timm's TorchScript (opset 17) and dynamo (opset 18,
external data) exports (scripts/export_timm.py).

(a) Raw tensors. For every model, onnxruntime (CPUExecutionProvider, 1 thread)
    and `pfe run MODEL --input x.npy --output y.npy` on the same seeded
    1x3x224x224 N(0,1) input: max |pfe - ort| <= --tolerance (1e-3). For the
    models built from the weights, timm's own logits are checked the same way.

(b) Photos. Real photographs shipped with scikit-image (`skimage.data`: astronaut,
    coffee, chelsea, rocket, ...; PNG and camera JPEG, several sizes and aspect
    ratios, grayscale, crops and an upscaled thumbnail), or generated
    natural-looking images when scikit-image is missing. For each image and each
    --image-models model (default: the TorchScript export and ours): timm's
    eval transform (resolve_data_config + create_transform) on the PIL image ->
    onnxruntime logits = reference; `pfe run MODEL --image IMG --save-input t.npy
    --output y.npy` = ours. SQNR = 10 log10(sum ref^2 / sum (ref - ours)^2) per
    image and overall must be >= --min-sqnr (30 dB). The preprocessed tensors
    (timm's vs pfe's --save-input) are compared directly: max / mean abs diff,
    reported (and gated by --max-preprocess-diff when given). Edge cases (RGBA)
    are reported but do not gate.

Artefacts (weights, ONNX files, images, .npy, parity.json) go to --work-dir.
Exit status 0 when every gating check passes, 1 otherwise.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ARCH = "poolformer_s12"
SIZE = 224


# ----------------------------------------------------------------------------- helpers

class Checks:
    """Collects named checks; prints as it goes; summarises at the end."""

    def __init__(self):
        self.rows = []

    def add(self, section, name, value, limit, ok, gating=True, detail=""):
        row = dict(section=section, name=name, value=value, limit=limit, ok=bool(ok),
                   gating=gating, detail=detail)
        self.rows.append(row)
        tag = ("ok" if ok else "FAIL") if gating else ("ok" if ok else "warn")
        if value is None:
            val = "-"
        elif isinstance(value, float):
            val = f"{value:.2f}" if "dB" in name else f"{value:.3e}"
        else:
            val = str(value)
        print(f"  [{tag:>4}] {name}: {val}{('  ' + detail) if detail else ''}")
        return ok

    def error(self, section, name, message, gating=True):
        self.rows.append(dict(section=section, name=name, value=None, limit=None, ok=False,
                              gating=gating, detail=message))
        print(f"  [{'FAIL' if gating else 'warn':>4}] {name}: {message}")

    @property
    def failed(self):
        return [r for r in self.rows if r["gating"] and not r["ok"]]


def run_cmd(cmd, timeout=600):
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - start


def pfe(pfe_path, *args, timeout=600):
    rc, out, err, _ = run_cmd([pfe_path, *map(str, args)], timeout=timeout)
    if rc != 0:
        msg = (err.strip() or out.strip() or f"exit status {rc}").splitlines()
        raise RuntimeError(" | ".join(msg[-6:]))
    return out


_sessions = {}


def ort_session(path):
    import onnxruntime as ort
    if path not in _sessions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        _sessions[path] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return _sessions[path]


def ort_run(path, x):
    sess = ort_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def sqnr_db(ref, ours):
    ref = ref.astype(np.float64)
    err = np.sum((ref - ours.astype(np.float64)) ** 2)
    sig = np.sum(ref ** 2)
    if err == 0:
        return float("inf")
    return float(10 * np.log10(sig / err))


def tensor_diff(ours, ref, std):
    """max / mean abs diff, max in 8-bit pixel levels (1/255/std), fraction > 1e-4."""
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    step = 1 / 255 / np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    return float(diff.max()), float(diff.mean()), float((diff / step).max()), \
        float((diff > 1e-4).mean())


def short(path):
    return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path


# ----------------------------------------------------------------------------- images

def make_images(img_dir):
    """Writes the test photos; returns [(path, description, gating)]."""
    os.makedirs(img_dir, exist_ok=True)
    from PIL import Image
    out = []

    def save(img, name, desc, gating=True, **kw):
        path = os.path.join(img_dir, name)
        img.save(path, **kw)
        with Image.open(path) as im:
            sampling = jpeg_sampling(im)
        out.append((path, f"{desc}, {img.size[0]}x{img.size[1]} {img.mode}{sampling}", gating))

    try:
        import skimage
        data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
        if not os.path.isfile(os.path.join(data_dir, "astronaut.png")):
            raise ImportError("scikit-image without its bundled data")
    except ImportError:
        data_dir = None

    if data_dir:
        # Original files, byte for byte: PNGs and real camera JPEGs.
        for name, desc in [
            ("astronaut.png", "photo PNG"),
            ("coffee.png", "photo PNG"),
            ("chelsea.png", "photo PNG (cat)"),
            ("motorcycle_left.png", "photo PNG"),
            ("rocket.jpg", "photo JPEG"),
            ("hubble_deep_field.jpg", "photo JPEG"),
            ("retina.jpg", "photo JPEG, large"),
            ("camera.png", "grayscale photo PNG"),
        ]:
            src = os.path.join(data_dir, name)
            if not os.path.isfile(src):
                continue
            dst = os.path.join(img_dir, name)
            shutil.copyfile(src, dst)
            with Image.open(dst) as im:
                out.append((dst, f"{desc}, {im.size[0]}x{im.size[1]} {im.mode}{jpeg_sampling(im)}",
                            True))
        astro = Image.open(os.path.join(data_dir, "astronaut.png")).convert("RGB")
        coffee = Image.open(os.path.join(data_dir, "coffee.png")).convert("RGB")
        chelsea = Image.open(os.path.join(data_dir, "chelsea.png")).convert("RGB")
        moto = Image.open(os.path.join(data_dir, "motorcycle_left.png")).convert("RGB")
        # Same pixels as coffee.png, JPEG-encoded here (4:2:0): isolates decoder differences.
        save(coffee, "coffee_q90.jpg", "coffee.png re-encoded JPEG q90", quality=90)
        save(astro.crop((150, 20, 350, 500)), "astronaut_portrait.png", "portrait crop PNG")
        save(moto.crop((0, 160, 741, 340)), "motorcycle_panorama.png", "panorama crop PNG")
        save(chelsea.resize((120, 80), Image.BICUBIC), "chelsea_thumb.png",
             "thumbnail PNG (upscaled by the resize)")
        save(coffee.resize((301, 199), Image.LANCZOS), "coffee_odd.jpg",
             "odd-sized JPEG q95", quality=95)
        logo = os.path.join(data_dir, "logo.png")
        if os.path.isfile(logo):
            dst = os.path.join(img_dir, "logo_rgba.png")
            shutil.copyfile(logo, dst)
            out.append((dst, "RGBA PNG with transparency (edge case: alpha handling)", False))
    else:
        print("  scikit-image not installed (pip install scikit-image for real photos): "
              "using generated natural-looking images")
        for i, (w, h, fmt) in enumerate([(640, 480, "png"), (480, 640, "jpg"), (1024, 512, "png"),
                                         (300, 300, "jpg"), (160, 120, "png"), (1280, 720, "jpg")]):
            img = natural_image(w, h, seed=i)
            kw = {"quality": 90} if fmt == "jpg" else {}
            save(img, f"generated_{i}_{w}x{h}.{fmt}", f"generated {fmt.upper()}", **kw)
    return out


def jpeg_sampling(im):
    if im.format != "JPEG":
        return ""
    from PIL import JpegImagePlugin
    return {0: " 4:4:4", 1: " 4:2:2", 2: " 4:2:0"}.get(JpegImagePlugin.get_sampling(im), "")


def natural_image(w, h, seed):
    """Gradients + soft shapes + blurred multi-scale noise: a photo-like RGB image."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        80 + 120 * (yy / h),
        60 + 100 * (xx / w),
        140 - 60 * (yy / h) + 40 * np.sin(xx / w * 3 + seed),
    ], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(min(w, h) // 20 + 1, min(w, h) // 4 + 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=color)
        else:
            d.rectangle((x0 - r, y0 - r // 2, x0 + r, y0 + r // 2), fill=color)
    img = img.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img).astype(np.float32)
    for scale in (4, 16):
        n = rng.standard_normal((h // scale + 1, w // scale + 1, 3)).astype(np.float32)
        n = np.asarray(Image.fromarray(((n * 40) + 128).clip(0, 255).astype(np.uint8))
                       .resize((w, h), Image.BICUBIC)).astype(np.float32) - 128
        arr += n * 0.5
    arr += rng.standard_normal(arr.shape) * 3
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--pfe", default="target/release/pfe", help="pfe binary")
    parser.add_argument("--work-dir", default="target/parity", help="where artefacts go")
    parser.add_argument("--weights", help="timm state dict (safetensors); default: pfe synth")
    parser.add_argument("--synth-seed", type=int, default=0, help="seed for pfe synth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the raw input tensor")
    parser.add_argument("--models", nargs="+",
                        help="check these ONNX files in (a) instead of building them")
    parser.add_argument("--image-models", nargs="+",
                        help="models for (b) (default: the TorchScript export and ours)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max abs diff for (a)")
    parser.add_argument("--min-sqnr", type=float, default=30.0, help="dB, for (b)")
    parser.add_argument("--max-preprocess-diff", type=float, default=None,
                        help="gate the preprocessed-tensor max abs diff too (default: report only)")
    parser.add_argument("--skip-images", action="store_true", help="only (a)")
    parser.add_argument("--skip-dynamo", action="store_true", help="don't build the dynamo export")
    args = parser.parse_args()

    if not (os.path.isfile(args.pfe) and os.access(args.pfe, os.X_OK)):
        sys.exit(f"{args.pfe}: no pfe binary (cargo build --release --bin pfe, or --pfe PATH)")
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    checks = Checks()

    import onnxruntime
    import timm
    import torch
    sys.path.insert(0, HERE)
    from export_timm import load_state_dict
    print(f"pfe {args.pfe} | onnxruntime {onnxruntime.__version__} | timm {timm.__version__} | "
          f"torch {torch.__version__} | work dir {short(work)}")

    # ------------------------------------------------------------------ models
    built = {}  # label -> path, from the known weights (timm comparison applies)
    weights = args.weights
    if not args.models:
        print("\n== models")
        if weights is None:
            weights = os.path.join(work, f"{ARCH}_synth_seed{args.synth_seed}.safetensors")
            print("  " + pfe(args.pfe, "synth", "--arch", ARCH, "--seed", args.synth_seed,
                             "-o", weights).strip())
        ours = os.path.join(work, f"{ARCH}_pfe.onnx")
        try:
            print("  " + pfe(args.pfe, "export", "--arch", ARCH, "--weights", weights,
                             "-o", ours).strip())
            built["pfe export"] = ours
        except RuntimeError as e:
            checks.error("models", "pfe export", str(e))
        cmd = [sys.executable, os.path.join(HERE, "export_timm.py"), "--weights", weights,
               "--out-dir", work, "--seed", str(args.seed)]
        if args.skip_dynamo:
            cmd.append("--skip-dynamo")
        rc, out, err, secs = run_cmd(cmd, timeout=1200)
        log = os.path.join(work, "export_timm.log")
        with open(log, "w") as f:
            f.write(out + "\n--- stderr\n" + err)
        print(f"  scripts/export_timm.py: exit {rc} in {secs:.0f} s (log {short(log)})")
        ts = os.path.join(work, f"{ARCH}_torchscript.onnx")
        dy = os.path.join(work, f"{ARCH}_dynamo.onnx")
        if os.path.isfile(ts):
            built["timm torchscript (opset 17)"] = ts
        if os.path.isfile(dy) and not args.skip_dynamo:
            built["timm dynamo (opset 18, external data)"] = dy
        if rc != 0:
            checks.error("models", "export_timm.py", (err.strip() or out.strip())[-500:])
        models = dict(built)
    else:
        models = {short(m): os.path.abspath(m) for m in args.models}

    timm_model = None
    if weights and built:
        timm_model = timm.create_model(ARCH, pretrained=False).eval()
        load_state_dict(timm_model, weights)

    # ------------------------------------------------------------------ (a) raw tensors
    print(f"\n== (a) raw input: seeded N(0,1) 1x3x{SIZE}x{SIZE}, pfe vs onnxruntime (1 thread)")
    x = np.random.default_rng(args.seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    x_path = os.path.join(work, "parity_input.npy")
    np.save(x_path, x)
    timm_logits = None
    if timm_model is not None:
        with torch.no_grad():
            timm_logits = timm_model(torch.from_numpy(x)).numpy()
        print(f"  timm logits: max |logit| {np.abs(timm_logits).max():.4f}, "
              f"top-1 {int(timm_logits.argmax())}")
    raw_results = {}
    for label, path in models.items():
        print(f"  -- {label}: {short(path)}")
        tag = os.path.splitext(os.path.basename(path))[0]
        y_path = os.path.join(work, f"{tag}_pfe_logits.npy")
        try:
            ref = ort_run(path, x)
        except Exception as e:  # noqa: BLE001
            checks.error("a", f"{label}: onnxruntime", f"{type(e).__name__}: {e}")
            ref = None
        try:
            pfe(args.pfe, "run", path, "--input", x_path, "--output", y_path)
            ours = np.load(y_path)
        except RuntimeError as e:
            checks.error("a", f"{label}: pfe run", str(e))
            ours = None
        if ref is not None and ours is not None:
            if ref.shape != ours.shape:
                checks.error("a", f"{label}: shapes", f"ort {ref.shape} vs pfe {ours.shape}")
                continue
            d = float(np.abs(ref.astype(np.float64) - ours).max())
            raw_results[label] = d
            checks.add("a", f"{label}: max |pfe - ort|", d, args.tolerance, d <= args.tolerance,
                       detail=f"(max |logit| {np.abs(ref).max():.3f}, top-1 ort {int(ref.argmax())}"
                              f" pfe {int(ours.argmax())})")
        if timm_logits is not None and label in built:
            if ours is not None:
                d = float(np.abs(timm_logits.astype(np.float64) - ours).max())
                checks.add("a", f"{label}: max |pfe - timm|", d, args.tolerance,
                           d <= args.tolerance)
            if ref is not None:
                d = float(np.abs(timm_logits.astype(np.float64) - ref).max())
                checks.add("a", f"{label}: max |ort - timm|", d, args.tolerance,
                           d <= args.tolerance)

    # ------------------------------------------------------------------ (b) photos
    pre_rows = []
    if not args.skip_images:
        from PIL import Image
        if args.image_models:
            image_models = {short(m): os.path.abspath(m) for m in args.image_models}
        else:
            image_models = {k: v for k, v in models.items()
                            if "torchscript" in k or k == "pfe export"} or dict(models)
        cfg_model = timm_model or timm.create_model(ARCH, pretrained=False)
        cfg = timm.data.resolve_data_config({}, model=cfg_model)
        transform = timm.data.create_transform(**cfg)
        print(f"\n== (b) photos: timm eval transform -> onnxruntime vs pfe run --image")
        print(f"  timm data config {cfg}")
        print(f"  transform: {' -> '.join(type(t).__name__ for t in transform.transforms)}")
        images = make_images(os.path.join(work, "images"))
        per_model = {label: dict(sig=0.0, err=0.0) for label in image_models}
        for img_path, desc, gating in images:
            name = os.path.basename(img_path)
            stem = os.path.splitext(name)[0] + "_" + name.rsplit(".", 1)[1]
            print(f"  -- {name}: {desc}")
            with Image.open(img_path) as im:
                ref_x = transform(im.convert("RGB")).unsqueeze(0).numpy().astype(np.float32)
            np.save(os.path.join(work, f"{stem}_timm_input.npy"), ref_x)
            first = True
            for label, model_path in image_models.items():
                tag = os.path.splitext(os.path.basename(model_path))[0]
                t_path = os.path.join(work, f"{stem}_pfe_input.npy")
                y_path = os.path.join(work, f"{stem}_{tag}_pfe_logits.npy")
                try:
                    extra = ["--save-input", t_path] if first else []
                    pfe(args.pfe, "run", model_path, "--image", img_path, "--output", y_path, *extra)
                    ours = np.load(y_path)
                except RuntimeError as e:
                    checks.error("b", f"{name} [{label}]: pfe run --image", str(e), gating)
                    continue
                if first:
                    first = False
                    pfe_x = np.load(t_path)
                    if pfe_x.shape != ref_x.shape:
                        checks.error("b", f"{name}: preprocessed shape",
                                     f"timm {ref_x.shape} vs pfe {pfe_x.shape}", gating)
                    else:
                        mx, mean, levels, frac = tensor_diff(pfe_x, ref_x, cfg["std"])
                        pre_rows.append(dict(image=name, max=mx, mean=mean, levels=levels,
                                             frac=frac))
                        limit = args.max_preprocess_diff
                        checks.add("b", f"{name}: preprocessed max |pfe - timm|", mx, limit,
                                   limit is None or mx <= limit,
                                   gating=gating and limit is not None,
                                   detail=f"(mean {mean:.2e}, max {levels:.2f} pixel levels, "
                                          f"{100 * frac:.1f}% of values differ > 1e-4)")
                    if name.lower().endswith((".jpg", ".jpeg")):
                        # Same pixels as PIL decodes them, losslessly: separates the JPEG
                        # decoder's share of the difference from the resize's.
                        png = os.path.join(work, "images", "pil_decoded", name + ".png")
                        os.makedirs(os.path.dirname(png), exist_ok=True)
                        with Image.open(img_path) as im:
                            im.convert("RGB").save(png)
                        t2 = os.path.join(work, f"{stem}_pildecoded_pfe_input.npy")
                        try:
                            pfe(args.pfe, "run", model_path, "--image", png, "--save-input", t2,
                                "--output", os.path.join(work, "scratch_logits.npy"))
                            mx2, mean2, lv2, fr2 = tensor_diff(np.load(t2), ref_x, cfg["std"])
                            checks.add("b", f"{name}: same, from PIL-decoded pixels (PNG)", mx2,
                                       None, True, gating=False,
                                       detail=f"(mean {mean2:.2e}, max {lv2:.2f} pixel levels, "
                                              f"{100 * fr2:.1f}% differ > 1e-4; the rest is "
                                              f"the JPEG decoder)")
                            if pre_rows and pre_rows[-1]["image"] == name:
                                pre_rows[-1].update(pil_decoded_max=mx2, pil_decoded_mean=mean2)
                        except RuntimeError as e:
                            checks.error("b", f"{name}: PIL-decoded PNG", str(e), gating=False)
                ref = ort_run(model_path, ref_x)
                db = sqnr_db(ref, ours)
                per_model[label]["sig"] += float(np.sum(ref.astype(np.float64) ** 2))
                per_model[label]["err"] += float(np.sum((ref.astype(np.float64) - ours) ** 2))
                checks.add("b", f"{name} [{label}]: SQNR dB", round(db, 2), args.min_sqnr,
                           db >= args.min_sqnr, gating=gating,
                           detail=f"(top-1 ref {int(ref.argmax())} pfe {int(ours.argmax())})")
        print("  -- overall")
        for label, acc in per_model.items():
            if acc["sig"] == 0:
                continue
            db = float("inf") if acc["err"] == 0 else 10 * np.log10(acc["sig"] / acc["err"])
            checks.add("b", f"overall [{label}]: SQNR dB", round(float(db), 2), args.min_sqnr,
                       db >= args.min_sqnr)

    # ------------------------------------------------------------------ summary
    report = os.path.join(work, "parity.json")
    with open(report, "w") as f:
        json.dump(dict(pfe=args.pfe, models=models, checks=checks.rows, preprocess=pre_rows),
                  f, indent=2, default=str)
    n_gating = sum(1 for r in checks.rows if r["gating"])
    print(f"\n== summary: {n_gating - len(checks.failed)}/{n_gating} gating checks passed "
          f"(details in {short(report)})")
    for r in checks.failed:
        val = "" if r["value"] is None else f"{r['value']} "
        print(f"  FAIL [{r['section']}] {r['name']}: {val}{r['detail']}")
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
