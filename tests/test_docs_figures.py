"""tools/make_docs_figures.py: the README's pictures from a run's log and demo output."""
import json

import numpy as np
import pytest
from PIL import Image

from datasets.synthetic import make_synthetic_coco
from test_plot_logs import write_run
from tools import make_docs_figures

MAX_BYTES = 150_000  # each picture; the README's two stay small in git
BOX = [10.0, 12.0, 50.0, 60.0]


def test_pictures_from_a_run(tmp_path):
    make_synthetic_coco(out_dir=tmp_path / "shapes", num_train=0, num_val=3, image_size=96, seed=0)
    files = sorted((tmp_path / "shapes" / "val2017").glob("*.jpg"))
    run = write_run(tmp_path, "run", epochs=4, scale=1.0)
    (run / "demo").mkdir()
    records = [{"image": str(f), "detections": [{"label": 1, "name": "circle", "score": 0.9, "box_xyxy": BOX}]}
               for f in files]
    (run / "demo" / "detections.json").write_text(json.dumps(records))
    demo_png, curves_png = make_docs_figures.main(["--run", str(run), "--out", str(tmp_path / "docs"),
                                                   "--num_images", "2"])
    assert all(0 < p.stat().st_size < MAX_BYTES for p in (demo_png, curves_png))
    with Image.open(files[0]) as first, Image.open(demo_png) as mosaic:
        scale = make_docs_figures.ENLARGE
        assert mosaic.height == scale * max(Image.open(f).height for f in files[:2])
        assert mosaic.width == scale * sum(Image.open(f).width for f in files[:2]) + make_docs_figures.GAP
        # the box is drawn, enlarged, where the detection says
        tile = np.asarray(mosaic.convert("RGB"), np.int16)[:, :first.width * scale]
        plain = np.asarray(first.convert("RGB").resize((first.width * scale, first.height * scale)), np.int16)
        x1, y1, x2, y2 = (round(v * scale) for v in BOX)
        assert np.abs(tile[(y1 + y2) // 2, x1] - plain[(y1 + y2) // 2, x1]).max() > 60


def test_asks_for_the_demo_first(tmp_path):
    run = write_run(tmp_path, "run", epochs=2, scale=1.0)
    with pytest.raises(SystemExit, match="demo"):
        make_docs_figures.main(["--run", str(run), "--out", str(tmp_path / "docs")])
