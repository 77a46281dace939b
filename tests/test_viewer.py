"""`pathomics view`: Deep Zoom tiles against OpenSlide's generator, the overlay data, the server's
security (loopback only, nothing outside OUT), and the page itself in headless Chromium."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from browser import CHROMIUM, SKIP_REASON, Browser
from scipy.stats import rankdata

from pathomics import TileConfig, open_slide, tile_slide
from pathomics.cli.main import main
from pathomics.embed import EmbedConfig, embed_store
from pathomics.layout import OutputLayout
from pathomics.mil.artifacts import SlideResult, write_attention, write_signatures
from pathomics.store import open_patch_store
from pathomics.synthetic import write_slide
from pathomics.tissue import read_geojson
from pathomics.viewer import DeepZoom, ViewerServer

# What the page draws (pathomics/viewer/static/viewer.js): colours and alphas the screenshots must show.
TISSUE_FILL, PATCH_FILL, QC_FILL = ((0, 255, 0), 0.2), ((0, 0, 255), 0.3), ((255, 0, 255), 0.5)
ATTENTION_ALPHA, LOW, HIGH = 0.5, (49, 54, 149), (165, 0, 38)
OTHER_RISKS = {"other-a": -1.0, "other-b": 0.2, "other-c": 0.5}  # the fixture slide's risk (2.0) ranks first of 4


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output directory with one tiled and embedded slide, its attention, risks of a cohort and a QC table.

    Attention rises with x (then y), so the rightmost patch has the most; QC flags the top row as pen.
    """
    root = tmp_path_factory.mktemp("viewer")
    slide = write_slide(root / "s1.svs", 3072, 2048, mpp=0.25, layout="blob", seed=5)
    out = root / "out"
    tiled = tile_slide(slide.path, out, TileConfig(target_mpp=0.5, patch_size=128, threads=1))
    embed_store(tiled.path, out, EmbedConfig(model="shufflenet-v2", weights="random", device="cpu", precision="fp32",
                                             num_workers=0, batch_size=64, input_size=64))
    coords = open_patch_store(tiled.path).coords
    logits = (coords[:, 0] + coords[:, 1] / 10) / 500
    attention = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    result = SlideResult("s1", "p1", 0, 2.0, np.zeros(4, np.float32), attention, coords)
    layout = OutputLayout(out)
    write_attention(layout.attention_file("s1"), result, "abmil", {})
    others = [SlideResult(s, s, 0, r, np.zeros(4, np.float32), np.ones(1), np.zeros((1, 2))) for s, r in OTHER_RISKS.items()]
    write_signatures(layout.signatures, [result, *others], "abmil", {})
    pen = coords[:, 1] == coords[:, 1].min()
    layout.qc_table("s1").parent.mkdir(exist_ok=True)  # tiling wrote its own QC; this test plants known flags
    pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "focus": np.linspace(0, 1, len(coords)), "pen": pen * 0.3,
                  "flag_pen": pen, "flag_blur": np.zeros(len(coords), bool), "qc_pass": ~pen}).to_parquet(layout.qc_table("s1"))
    return out


@contextmanager
def serving(out: Path, slides_dir: Path | None = None) -> Iterator[ViewerServer]:
    """A viewer server for ``out`` answering in a background thread."""
    with ViewerServer(out, slides_dir=slides_dir) as srv:
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            yield srv
        finally:
            srv.shutdown()
            thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(out: Path) -> Iterator[ViewerServer]:
    with serving(out) as srv:
        yield srv


def get(server: ViewerServer, path: str, host: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` sent exactly as written (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{server.port}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_deep_zoom_matches_openslide_generator(out: Path) -> None:
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    source = Path(open_patch_store(out / "tiles" / "s1.zarr").attrs["source_path"])
    with OpenSlide(source) as reference:
        ours, theirs = DeepZoom(open_slide(source)), DeepZoomGenerator(reference, tile_size=254, overlap=1)
        via_openslide = DeepZoom(open_slide(source, backend="openslide"), direct=False)
        assert ours.direct and not via_openslide.direct
        assert ours.level_count == theirs.level_count
        assert ours.level_dimensions == theirs.level_dimensions
        assert [ours.level_tiles(z) for z in range(ours.level_count)] == list(theirs.level_tiles)
        for level in range(ours.level_count):
            cols, rows = ours.level_tiles(level)
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                mine = ours.tile_array(level, col, row)
                np.testing.assert_array_equal(mine, via_openslide.tile_array(level, col, row))  # direct decoding = OpenSlide's
                assert mine.shape[1::-1] == theirs.get_tile_dimensions(level, (col, row)), (level, col, row)
                if min(ours.level_dimensions[level]) < 64:  # PIL's thumbnail rounds tiny tiles to its own aspect ratio
                    continue
                ref = np.asarray(theirs.get_tile(level, (col, row)).convert("RGB"))
                assert mine.shape == ref.shape, (level, col, row)
                diff = np.abs(mine.astype(int) - ref.astype(int)).mean()
                assert diff <= (0 if level == ours.level_count - 1 else 2.5), (level, col, row, diff)
        with pytest.raises(KeyError):
            ours.tile_box(ours.level_count - 1, cols, 0)
        root = ET.fromstring(ours.dzi())
        ours.close()
        via_openslide.close()
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (root.get("TileSize"), root.get("Overlap"), size.get("Width"), size.get("Height")) == ("254", "1", "3072", "2048")


def test_overlay_data_follows_the_output_files(out: Path, server: ViewerServer) -> None:
    status, body = get(server, "/api/slides")
    index = json.loads(body)
    assert status == 200 and index["problems"] == []
    assert [(s["slide_id"], s["risk"], s["risk_rank"], s["cohort_size"]) for s in index["slides"]] == [("s1", 2.0, 1, 4)]
    thumbnail = index["slides"][0]["thumbnail"]
    assert thumbnail == "out/tiles/s1.thumb.png" and get(server, "/" + thumbnail)[1] == (out / "tiles" / "s1.thumb.png").read_bytes()
    status, body = get(server, "/api/slides/s1/overlays")
    data = json.loads(body)
    coords = open_patch_store(out / "tiles" / "s1.zarr").coords
    assert status == 200 and data["problems"] == [] and data["patch_size_level0"] == 256
    assert (data["width"], data["height"], data["risk_percentile"]) == (3072, 2048, 1.0)
    np.testing.assert_array_equal(np.c_[data["patches"]["x"], data["patches"]["y"]], coords)
    attention = data["attention"]
    np.testing.assert_allclose(attention["scaled"], (rankdata(attention["value"]) - 1) / (len(coords) - 1), rtol=1e-12)
    top = coords[:, 1] == coords[:, 1].min()
    assert data["qc"]["pass"] == (~top).tolist() and data["qc"]["flags"] == {"pen": top.tolist(), "blur": [False] * len(coords)}
    tissue = read_geojson(out / "tiles" / "s1.tissue.geojson")
    assert len(data["tissue"]) == len(tissue.geoms)
    np.testing.assert_allclose(data["tissue"][0][0], np.asarray(tissue.geoms[0].exterior.coords), atol=0.5)


def test_optional_overlays_absent_or_unreadable(out: Path, tmp_path: Path) -> None:
    """Without QC or attention files there is no overlay; a QC table without qc_pass is a problem, not a crash."""
    from pathomics.viewer.catalog import find_slide, slide_overlays

    bare = tmp_path / "bare"
    (bare / "tiles").mkdir(parents=True)
    for name in ("s1.zarr", "s1.tissue.geojson"):
        (bare / "tiles" / name).symlink_to(out / "tiles" / name)
    layout = OutputLayout(bare)
    data = slide_overlays(layout, find_slide(layout, "s1"))
    assert (data["qc"], data["attention"], data["risk"], data["problems"]) == (None, None, None, [])
    (bare / "qc").mkdir()
    pd.DataFrame({"x": [0], "y": [0], "pen": [True]}).to_parquet(layout.qc_table("s1"))
    data = slide_overlays(layout, find_slide(layout, "s1"))
    assert data["qc"] is None and len(data["problems"]) == 1 and "lacks column(s) qc_pass" in data["problems"][0]
    with pytest.raises(KeyError):
        find_slide(layout, "../out/tiles/s1")


def test_moved_slides_are_found_with_slides_dir(out: Path, tmp_path: Path) -> None:
    import zarr

    moved = tmp_path / "moved"
    shutil.copytree(out / "tiles", moved / "tiles")
    store = zarr.open_group(moved / "tiles" / "s1.zarr", mode="r+", zarr_format=3)
    source = Path(store.attrs["source_path"])
    store.attrs["source_path"] = str(tmp_path / "gone" / source.name)
    for slides_dir, status, says in ((None, 404, b"pass --slide-dir DIR"), (source.parent, 200, b"<Image")):
        with serving(moved, slides_dir) as srv:
            answer = get(srv, "/dzi/s1.dzi")
        assert answer[0] == status and says in answer[1], answer


def test_server_listens_on_loopback_only(server: ViewerServer) -> None:
    assert server.server_address[0] == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}/"
    others = ["127.0.0.2"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the address of the outgoing interface, if any
        try:
            probe.connect(("192.0.2.1", 9))
            others.append(probe.getsockname()[0])
        except OSError:
            pass
    for address in others:
        if address != "127.0.0.1":
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, server.port), timeout=5).close()
    assert get(server, "/api/slides")[0] == 200
    assert get(server, "/api/slides", host="attacker.example")[0] == 403  # DNS rebinding


def test_server_refuses_paths_outside_out(out: Path, server: ViewerServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    secret = tmp_path_factory.mktemp("secret") / "secret.txt"
    secret.write_text("do not serve me")
    (out / "link.txt").symlink_to(secret)
    (out / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    (out / "notes.txt").write_text("inside")
    relative = Path("../" * len(out.parts)).as_posix() + str(secret).lstrip("/")
    refused = [
        f"/out/{relative}", "/out/../secret.txt", f"/out/%2e%2e/%2e%2e/{relative}", f"/out/%2e%2e%2f{relative}",
        f"/out/{secret}", f"/out//{secret}", f"/out/%2f{str(secret).lstrip('/')}", "/out/link.txt", "/out/linkdir/secret.txt",
        "/static/../../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/out/tiles/..%5c..%5cx",
    ]
    for path in refused:
        status, body = get(server, path)
        assert status == 403 and b"do not serve me" not in body and b"root:" not in body, (path, status, body)
    for path in ("/out/missing.txt", "/dzi/..%2f..%2fsecret.dzi", "/api/slides/%2e%2e/overlays", "/dzi/s1_files/99/0_0.jpeg", "/nothing"):
        assert get(server, path)[0] == 404, path
    assert get(server, "/out/notes.txt") == (200, b"inside")
    assert get(server, "/out/tiles/s1.thumb.png")[1][:8] == b"\x89PNG\r\n\x1a\n"


def test_server_closes_slides_it_no_longer_uses(server: ViewerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pathomics.viewer.server.OPEN_SLIDES", 0)
    for _ in range(2):
        status, body = get(server, "/dzi/s1_files/12/1_1.jpeg")
        assert status == 200 and body[:2] == b"\xff\xd8"
    assert (server._zooms, server._users, server._closing) == ({}, {}, [])


def test_dropped_connections_are_not_reported_as_errors(server: ViewerServer, capsys: pytest.CaptureFixture[str]) -> None:
    for error in (BrokenPipeError(), ConnectionResetError(), ValueError("a bug")):
        try:
            raise error
        except Exception:  # noqa: BLE001 - handle_error reads the exception being handled, as socketserver calls it
            server.handle_error(None, ("127.0.0.1", 1))
    assert capsys.readouterr().err.count("Traceback") == 1


def test_cli_view_prints_its_address_and_stops_on_ctrl_c(out: Path) -> None:
    # SIGINT back to its default in the child: a shell's background job starts with it ignored (POSIX)
    with subprocess.Popen([sys.executable, "-m", "pathomics.cli.main", "view", str(out)], stdout=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            url = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
            assert url and "1 slide(s)" in line, line
            conn = http.client.HTTPConnection("127.0.0.1", int(url[2]), timeout=30)
            conn.request("GET", "/api/slides")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()  # never leave the test waiting on a server that did not stop


def test_cli_view_refuses_a_folder_without_tiles_a_busy_port_and_a_bad_one(
        out: Path, server: ViewerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["view", str(tmp_path)]) == 2
    assert "no tiles/ folder" in capsys.readouterr().err
    assert main(["view", str(out), "--port", str(server.port)]) == 2
    assert "choose another --port" in capsys.readouterr().err
    assert main(["view", str(out), "--port", "70000"]) == 2
    assert "port must be 0 (a free one) to 65535" in capsys.readouterr().err


def blend(base: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    return base * (1 - alpha) + np.asarray(colour) * alpha


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_page_renders_tiles_and_toggles_overlays(out: Path, server: ViewerServer, tmp_path: Path) -> None:
    coords = open_patch_store(out / "tiles" / "s1.zarr").coords
    overlays = json.loads(get(server, "/api/slides/s1/overlays")[1])
    attention, size = overlays["attention"], overlays["patch_size_level0"]
    kept = {tuple(c) for c in coords.tolist()}
    with closing(Browser(tmp_path / "profile", 900, 600)) as page:
        page.open(server.url + "#slide=s1&overlays=tissue,attention", "window.pathomicsView && pathomicsView.state.ready")
        page.evaluate("pathomicsView.ready()")
        checked = "Array.from(document.querySelectorAll('#overlays input:checked'), b => b.value).join(',')"
        assert page.evaluate(checked) == "tissue,attention"  # set from the URL
        both = page.screenshot()

        def toggle(name: str) -> np.ndarray:
            page.evaluate(f"""new Promise(resolve => {{
                addEventListener("hashchange", () => requestAnimationFrame(() => requestAnimationFrame(resolve)), {{once: true}});
                document.querySelector('#overlays input[value="{name}"]').click(); }})""")
            return page.screenshot()

        def at(x: float, y: float) -> tuple[int, int]:
            px, py = page.evaluate(f"pathomicsView.toPage({x}, {y})")
            return round(py), round(px)

        toggle("tissue")
        base = toggle("attention")
        assert page.evaluate(checked) == "" and page.evaluate("location.hash") == "#slide=s1&overlays="

        # Tiles: the slide's own pixels where OpenSeadragon says they are (shifting by 3 px matches far worse).
        scale = page.evaluate("pathomicsView.toPage(1000, 0)[0] - pathomicsView.toPage(0, 0)[0]") / 1000
        with open_slide(Path(open_patch_store(out / "tiles" / "s1.zarr").attrs["source_path"])) as reader:
            truth = cv2.resize(reader.read_region((1024, 512), 0, (1024, 1024)), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        r, c = at(1024, 512)
        mad = {(dy, dx): np.abs(base[r + dy:r + dy + truth.shape[0], c + dx:c + dx + truth.shape[1]] - truth.astype(int)).mean()
               for dy in (-3, 0, 3) for dx in (-3, 0, 3)}
        assert mad[0, 0] < 9 and all(v > 1.5 * mad[0, 0] for k, v in mad.items() if k != (0, 0)), mad
        background = at(100, 100)
        assert base[background].min() > 200 and np.abs(base[at(1536, 1024)].astype(int) - base[background]).max() > 30

        centre = {tuple(c): at(c[0] + size / 2, c[1] + size / 2) for c in coords.tolist()}
        # Kept patches: every patch centre blended with blue; an unkept cell unchanged; edges where the tiles are.
        shot = toggle("patches")
        for c, rc in centre.items():
            np.testing.assert_allclose(shot[rc], blend(base[rc], *PATCH_FILL), atol=4, err_msg=str(c))
        assert np.array_equal(shot[at(128, 128)], base[at(128, 128)])
        edge = next(c for c in kept if (c[0] - size, c[1]) not in kept)
        inside, outside = at(edge[0] + 2 / scale, edge[1] + size / 2), at(edge[0] - 2 / scale, edge[1] + size / 2)
        np.testing.assert_allclose(shot[inside], blend(base[inside], *PATCH_FILL), atol=4)
        np.testing.assert_array_equal(shot[outside], base[outside])
        toggle("patches")

        # QC: the flagged top row in magenta, passing patches untouched.
        shot = toggle("qc")
        top = coords[:, 1].min()
        for c, rc in centre.items():
            expected = blend(base[rc], *QC_FILL) if c[1] == top else base[rc]
            np.testing.assert_allclose(shot[rc], expected, atol=4, err_msg=str(c))
        toggle("qc")

        # Attention: the most attended patch red, the least blue (rank colours, half transparent).
        shot = toggle("attention")
        hi, lo = centre[tuple(coords[int(np.argmax(attention["value"]))])], centre[tuple(coords[int(np.argmin(attention["value"]))])]
        np.testing.assert_allclose(shot[hi], blend(base[hi], HIGH, ATTENTION_ALPHA), atol=4)
        np.testing.assert_allclose(shot[lo], blend(base[lo], LOW, ATTENTION_ALPHA), atol=4)
        # The first view, with the overlays the URL named: tissue under attention.
        np.testing.assert_allclose(both[hi], blend(blend(base[hi], *TISSUE_FILL), HIGH, ATTENTION_ALPHA), atol=4)
        toggle("attention")

        # Tissue: filled green inside, outline green on the polygon's vertices.
        shot = toggle("tissue")
        middle = at(1536, 1024)
        np.testing.assert_allclose(shot[middle], blend(base[middle], *TISSUE_FILL), atol=4)
        ring = read_geojson(out / "tiles" / "s1.tissue.geojson").geoms[0].exterior.coords
        for x, y in list(ring)[:: max(1, len(ring) // 8)]:
            r, c = at(x, y)
            block = shot[r - 1:r + 2, c - 1:c + 2].reshape(-1, 3).astype(int)
            assert (block[:, 1] - block[:, [0, 2]].max(1)).max() > 80, (x, y, block)
        toggle("tissue")

        # Risk: a badge in the cohort-rank colour (the slide ranks first of four: the top colour).
        assert page.evaluate("document.querySelector('#risk').hidden")
        shot = toggle("risk")
        left, top_px = page.evaluate("(b => [b.left, b.top])(document.querySelector('#risk').getBoundingClientRect())")
        np.testing.assert_allclose(shot[int(top_px) + 3, int(left) + 3], HIGH, atol=2)
        assert page.evaluate("document.querySelector('#risk').textContent") == "risk 2.000 · rank 1 of 4"
        page.evaluate("""new Promise(resolve => {
            addEventListener("hashchange", () => requestAnimationFrame(resolve), {once: true});
            document.querySelector("#slides a").click(); })""")
        assert page.evaluate("location.hash") == "#slide=s1" and page.evaluate(checked) == "risk"  # a slide link keeps the overlays

        # Hovering a patch names its attention rank and QC flags.
        def hover(x: float, y: float) -> str:
            px, py = page.evaluate(f"pathomicsView.toPage({x}, {y})")
            page.send("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=px, y=py)
            return page.evaluate("new Promise(r => requestAnimationFrame(r)).then(() => document.querySelector('#info').textContent)")

        best = coords[int(np.argmax(attention["value"]))]
        said = hover(best[0] + size / 2, best[1] + size / 2)
        assert said.startswith(f"patch at ({best[0]}, {best[1]}) · attention ") and f"(rank 1 of {len(coords)})" in said, said
        assert said.endswith("QC flagged: pen" if best[1] == top else "QC passed"), said
        first_top = coords[coords[:, 1] == top][0]
        assert hover(first_top[0] + 10, first_top[1] + 10).endswith("· QC flagged: pen")
        assert hover(100, 100) == ""
