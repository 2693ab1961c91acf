"""Classify your own images with a trained row: the top classes with their probabilities.

    python -m fashionbench.predict shoe.jpg shirt.png                    # the cnn row, seed 0
    python -m fashionbench.predict shoe.jpg --model resnet7              # another deep row
    python -m fashionbench.predict shoe.jpg --model svm-hog --json       # an SVM row, JSON out
    python -m fashionbench.predict shoe.jpg --model models/cnn/seed0/model.pt

Any PNG/JPEG (any size, colour or grey, dark-on-light or light-on-dark) is brought to what
the model was trained on, as its model.pt records it (dataset, input size, normalisation): for
a grey dataset, grey with the subject bright on a dark background where the dataset has it so
(a bright border means a dark-on-light photo, which is inverted); for a colour one (CIFAR-10),
RGB as it is. Then padded to a square, resized to the dataset's side and normalised with the
training statistics. An image already in the dataset's form (Fashion-MNIST: 28x28 grey, light
on dark) passes unchanged, so its prediction is exactly the evaluate stage's. An SVM pipeline
carries no dataset record: it is taken to be of the dataset params.yaml names.

Images of more than MAX_PIXELS pixels (80 megapixels) are refused from their header, before
they are decoded; a large one within the limit is reduced while it is decoded (a JPEG by its
DCT scale, others a strip at a time), so it is never held decoded twice.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import typer

from fashionbench.cli import user_errors
from fashionbench.dataset import FASHION_MNIST, Dataset
from fashionbench.errors import UserError

POLARITIES = ("auto", "light-on-dark", "dark-on-light")
# Refused from the header: 80 MP is a 64 MP phone's photo with room to spare, and below PIL's
# own decompression-bomb warning (89.5 MP); an 80 MP RGB image takes 320 MB decoded.
MAX_PIXELS = 80_000_000
WORK_SIDE = 1024  # a longer side is reduced by a whole factor to at least this while decoding
GREY_MODES = ("1", "L", "I", "I;16", "F")


class PredictError(UserError):
    """An image or model file that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Classifier:
    """A trained row reduced to what prediction needs."""

    path: Path
    dataset: Dataset                                     # images are brought to its stored form
    probabilities: Callable[[np.ndarray], np.ndarray]    # stored uint8 images -> (N, classes)
    kind: str                                            # what the probabilities are


def model_path(model: str) -> Path:
    """A model file from a path, a deep run ("cnn", "cnn-seed1") or an SVM row ("svm-hog")."""
    if model.endswith((".pt", ".joblib")) or "/" in model:
        return Path(model)
    if model.startswith("svm-"):
        return Path("models/svm") / model[4:] / "model.joblib"
    row, sep, seed = model.rpartition("-seed")
    return Path("models") / (row if sep else model) / f"seed{seed if sep else 0}" / "model.pt"


def _train_stage(path: Path) -> str:
    # models/svm/<recipe>/model.joblib and models/<row>/seed<N>/model.pt, as dvc.yaml writes them
    if path.suffix == ".joblib":
        return f"train_svm@{path.parent.name}"
    seed = path.parent.name.removeprefix("seed")
    return f"train_{path.parent.parent.name}@{seed}"


def _missing_model(path: Path) -> PredictError:
    return PredictError(f"model file {path} not found: {_how_to_get(path)}")


def _how_to_get(path: Path) -> str:
    """The stage that writes `path`, if params.yaml defines it; else the rows it defines."""
    parts = path.parts
    deep = len(parts) == 4 and parts[0] == "models" and parts[2].startswith("seed") and path.name == "model.pt"
    svm = len(parts) == 4 and parts[:2] == ("models", "svm") and path.name == "model.joblib"
    if not (deep or svm):
        return "give a model.pt or model.joblib path, or a row of params.yaml"
    rows = _params_rows()
    fetch = f"`dvc pull {path}` fetches it from the remote, or `dvc repro {_train_stage(path)}` trains it"
    if rows is None:  # no readable params.yaml here: the stage it would be
        return fetch
    seeds, svms = rows
    listed = (f"deep rows: {', '.join(seeds)} (another seed: cnn-seed1); SVM rows: "
              f"{', '.join('svm-' + v for v in svms)}")
    if svm and parts[2] not in svms:
        return f"params.yaml has no SVM row svm-{parts[2]}; its {listed}"
    if deep and parts[1] not in seeds:
        return f"params.yaml has no deep row {parts[1]!r}; its {listed}"
    seed = parts[2].removeprefix("seed")
    if deep and seed not in [str(s) for s in seeds[parts[1]]]:
        trained = ", ".join(f"{parts[1]}-seed{s}" for s in seeds[parts[1]])
        return f"params.yaml trains {parts[1]} with seeds {list(seeds[parts[1]])} only: use {trained}"
    return fetch


def _params_rows() -> tuple[dict[str, tuple[int, ...]], list[str]] | None:
    """Each deep row's seeds and the SVM recipes of ./params.yaml; None if it is absent or invalid."""
    from fashionbench.params import PARAMS_FILE, load_params

    try:
        params = load_params(PARAMS_FILE)
    except (UserError, OSError):
        return None
    return {row: tuple(params.seeds.get(row, ())) for row in params.recipes}, list(params.svm)


def load_classifier(path: Path, batch_size: int = 1024) -> Classifier:
    """The deep model (model.pt) or SVM pipeline (model.joblib) at `path`, on the CPU."""
    if not path.is_file():
        raise _missing_model(path)
    if path.suffix == ".joblib":
        return _svm_classifier(path)
    import torch

    from fashionbench.evaluate import predict_proba
    from fashionbench.models import load_trained, trained_dataset

    model, meta = load_trained(path)  # names the file and the stage when it does not load
    height = meta["input_shape"][1]
    cpu = torch.device("cpu")
    # images are brought to the stored side, then to the model's input as evaluation does
    return Classifier(path, trained_dataset(meta), lambda images: predict_proba(
        model, images, meta["mean"], meta["std"], batch_size, cpu, size=height), "probability")


def _svm_classifier(path: Path) -> Classifier:
    import joblib

    from fashionbench.evaluate import softmax

    try:
        pipeline = joblib.load(path)
        decision = pipeline.decision_function
    except Exception as err:  # truncated or foreign file: any unpickling error
        raise PredictError(f"{path} is not a readable SVM model ({type(err).__name__}): re-run "
                           f"`dvc repro {_train_stage(path)}` or `dvc pull {path}`") from None
    # SVMs give decision scores; their softmax ranks the classes but is not calibrated.
    return Classifier(path, _params_dataset(), lambda images: softmax(decision(images)), "svm-score-softmax")


def _params_dataset() -> Dataset:
    """The dataset params.yaml names (the SVM stages trained on it); Fashion-MNIST without one."""
    from fashionbench.params import PARAMS_FILE, load_params

    return load_params(PARAMS_FILE).dataset if PARAMS_FILE.is_file() else FASHION_MNIST


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def is_dark_on_light(image: np.ndarray) -> bool:
    """A bright border means a light background: a photo of a garment on paper, say."""
    return float(_border(image).mean()) > 127.5


def load_image(path: Path, dataset: Dataset = FASHION_MNIST, polarity: str = "auto") -> np.ndarray:
    """uint8 image in `dataset`'s stored form: grey (side, side) with the dataset's polarity, or
    RGB (side, side, 3) for a colour dataset; padded square, resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _opened(path) as opened:
            image = _decoded(opened)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
            grey = np.asarray(image.convert("L"))
            rgb = np.asarray(image.convert("RGB")) if dataset.channels == 3 else None
    except FileNotFoundError:
        raise PredictError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise PredictError(f"{path} is not an image this can read (PNG, JPEG, ...): {err}") from None
    if rgb is not None:  # photos in colour: no polarity to match
        return _fit(rgb, dataset.side, fill=int(np.median(_border(grey))))
    dark_on_light = is_dark_on_light(grey) if polarity == "auto" else polarity == "dark-on-light"
    if dark_on_light == dataset.light_on_dark:
        grey = 255 - grey
    return _fit(grey, dataset.side)


@contextlib.contextmanager
def _opened(path: Path):  # noqa: ANN202 (a PIL image, imported lazily)
    """The image at `path`, opened lazily (its header read, nothing decoded), refused when it
    has more than MAX_PIXELS pixels."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours is checked below, in one line
    try:
        opened = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with opened:
        width, height = opened.size
        if width * height > MAX_PIXELS:
            raise PredictError(f"{path} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), "
                               f"more than the {MAX_PIXELS / 1e6:.0f} megapixels predict reads: shrink it "
                               "first (any image editor; the model sees it at a few dozen pixels)")
        yield opened


def _decoded(opened):  # noqa: ANN001, ANN202 (PIL images, imported lazily)
    """`opened` decoded and upright (EXIF orientation). An image whose longer side is at least
    twice WORK_SIDE is reduced by a whole factor while it is decoded: a JPEG by its DCT scale
    (draft), any other by box averaging a strip at a time beside the one full decode, so the
    decoded image is never held twice."""
    from PIL import Image, ImageOps

    factor = max(opened.size) // WORK_SIDE
    if factor < 2:
        return ImageOps.exif_transpose(opened)
    orientation = opened.getexif().get(0x0112, 1)  # read before decoding: the copy has no EXIF
    alpha = opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info
    mode = "RGBA" if alpha else "L" if opened.mode in GREY_MODES else "RGB"
    opened.draft(mode if mode != "RGBA" else None, (opened.width // factor, opened.height // factor))
    opened.load()
    factor = max(1, max(opened.size) // WORK_SIDE)
    small = Image.new(mode, (-(-opened.width // factor), -(-opened.height // factor)))
    rows = factor * max(1, 2**21 // (opened.width * factor))  # strips of about 2 M pixels
    for top in range(0, opened.height, rows):
        strip = opened.crop((0, top, opened.width, min(top + rows, opened.height))).convert(mode)
        small.paste(strip.reduce(factor), (0, top // factor))
    turn = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
            7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}.get(orientation)
    return small.transpose(turn) if turn is not None else small


def _fit(image: np.ndarray, side: int, fill: int | None = None) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    if (height, width) == (side, side):
        return image
    square = max(height, width)
    fill = int(np.median(_border(image))) if fill is None else fill
    canvas = np.full((square, square, *image.shape[2:]), fill, dtype=np.uint8)
    top, left = (square - height) // 2, (square - width) // 2
    canvas[top:top + height, left:left + width] = image
    # Area averaging when shrinking keeps every pixel's weight (a 2x enlargement comes back exact).
    resample = Image.Resampling.BOX if square > side else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(canvas).resize((side, side), resample))


def predict(images: list[Path], classifier: Classifier, polarity: str = "auto",
            top: int = 3) -> list[dict]:
    """For each image, its `top` classes, most probable first. Every image is read before any
    is classified, so a bad file stops the command before it prints anything."""
    batch = np.stack([load_image(path, classifier.dataset, polarity) for path in images])
    probabilities = classifier.probabilities(batch)
    results = []
    for path, probs in zip(images, probabilities):
        best = np.argsort(-probs, kind="stable")[:top]
        results.append({"image": str(path), "model": str(classifier.path), "kind": classifier.kind,
                        "top": [{"class": classifier.dataset.classes[i], "index": int(i),
                                 "probability": round(float(probs[i]), 4)} for i in best]})
    return results


def main(images: list[Path] = typer.Argument(..., help=f"PNG/JPEG files of at most {MAX_PIXELS / 1e6:.0f} "
                                             "megapixels each"),
         model: str = typer.Option("cnn", help="a deep row (cnn, resnet7-seed1), an SVM row "
                                   "(svm-hog) or a model.pt / model.joblib path"),
         top: int = typer.Option(3, min=1, help="classes shown per image"),
         polarity: str = typer.Option("auto", help="auto | light-on-dark | dark-on-light"),
         as_json: bool = typer.Option(False, "--json", help="print JSON instead of text")) -> None:
    """Print the most probable classes of each image under a trained row."""
    with user_errors():
        if polarity not in POLARITIES:
            raise PredictError(f"--polarity {polarity!r}: use one of {', '.join(POLARITIES)}")
        classifier = load_classifier(model_path(model))
        if top > classifier.dataset.num_classes:
            raise PredictError(f"--top {top}: {classifier.dataset.display_name} has "
                               f"{classifier.dataset.num_classes} classes")
        results = predict(images, classifier, polarity, top)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for result in results:
        ranked = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
        typer.echo(f"{result['image']}: {ranked}")


if __name__ == "__main__":
    typer.run(main)
