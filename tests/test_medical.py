"""DICOM files and NIfTI volumes made at test time from the real head CT PNGs (their grey levels as
Hounsfield units): the decoded pixels equal the window formula to the last grey level, volumes become
one image a slice that never leaves its volume's split, and a DICOM and a NIfTI version of the set run
through `byol-runner run` with a brain window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.data.dataset import prepare
from runner.data.decode import ImageSettings, decode_file
from runner.data.medical import WINDOWS, window_to_uint8
from runner.data.sources import CsvSource, ImageFolderSource, scan_with_skips
from tests.conftest import real_data, run_cli

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

SIDE = 48


def ct_slices(ids: list[str]) -> dict[str, np.ndarray]:
    """Head CT PNGs as HU slices (SIDE x SIDE): grey level g becomes 2 g - 200 HU, and black is air (-1024), so
    that the brain (40/80), subdural (80/200) and bone (600/2800) windows each see a range of values."""
    root = real_data("head_ct")
    out = {}
    for i in ids:
        g = np.asarray(Image.open(root / f"{i}.png").convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR))
        out[i] = np.where(g == 0, -1024.0, g.astype(np.float64) * 2 - 200)
    return out


def window_ref(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 written out again, element by element, as the test's own reference."""
    c, w = level, width
    out = np.empty(hu.shape, np.uint8)
    for idx, x in np.ndenumerate(hu):
        if x <= c - 0.5 - (w - 1) / 2:
            out[idx] = 0
        elif x > c - 0.5 + (w - 1) / 2:
            out[idx] = 255
        else:
            out[idx] = int(np.floor(((x - (c - 0.5)) / (w - 1) + 0.5) * 255 + 0.5))
    return out


def write_ct(path: Path, hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0, photometric: str = "MONOCHROME2",
             patient: str = "P0", window: tuple[float, float] | None = None, enhanced: bool = False) -> np.ndarray:
    """A CT image (or a multi-frame one, `hu` of shape (frames, H, W)) with pydicom; returns the HU the
    stored values stand for (rounded to the slope's step)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    stored = np.rint((hu - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 65536
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", patient
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if enhanced:  # the rescale in the shared functional groups, as enhanced CT files keep it
        t = Dataset()
        t.RescaleSlope, t.RescaleIntercept, t.RescaleType = slope, intercept, "HU"
        shared = Dataset()
        shared.PixelValueTransformationSequence = Sequence([t])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
    else:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.PixelData = stored.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return stored * slope + intercept


@pytest.mark.parametrize("slope,intercept,photometric", [(1.0, -1024.0, "MONOCHROME2"), (2.0, -1024.0, "MONOCHROME2"),
                                                         (0.5, -1024.0, "MONOCHROME1")])
@pytest.mark.parametrize("window", ["brain", "subdural", "bone"])
def test_a_ct_slice_decodes_to_the_window_formula_to_the_last_grey_level(tmp_path, slope, intercept, photometric, window):
    hu = ct_slices(["000"])["000"]
    hu = write_ct(tmp_path / "a.dcm", hu, slope, intercept, photometric)
    level, width = WINDOWS[window]
    d = decode_file(str(tmp_path / "a.dcm"), ImageSettings(SIDE, "pad", ((level, width),)))
    assert d.error is None and d.mode == f"DICOM {photometric}" and d.native_size == (SIDE, SIDE)
    expected = window_ref(hu, level, width)
    assert len(np.unique(expected)) > 20  # a window that sees the image, not a flat one
    if photometric == "MONOCHROME1":  # stored bright-is-low: inverted, so bright means dense as in every image
        expected = 255 - expected
    assert np.array_equal(d.pixels, expected)
    assert np.array_equal(window_to_uint8(hu, level, width), window_ref(hu, level, width))


def test_three_windows_are_three_channels_and_a_file_s_own_window_is_used_when_none_is_set(tmp_path):
    hu = write_ct(tmp_path / "a.dcm", ct_slices(["001"])["001"], window=(40, 80))
    three = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
    d = decode_file(str(tmp_path / "a.dcm"), ImageSettings(SIDE, "pad", three))
    assert d.pixels.shape == (SIDE, SIDE, 3) and not d.gray
    for ch, (c, w) in enumerate(three):
        assert np.array_equal(d.pixels[..., ch], window_ref(hu, c, w)) and len(np.unique(d.pixels[..., ch])) > 20
    own = decode_file(str(tmp_path / "a.dcm"), ImageSettings(SIDE, "pad"))
    assert np.array_equal(own.pixels, window_ref(hu, 40, 80))
    write_ct(tmp_path / "b.dcm", ct_slices(["001"])["001"])  # no window in the file: its own range
    plain = decode_file(str(tmp_path / "b.dcm"), ImageSettings(SIDE, "pad"))
    assert plain.pixels.min() == 0 and plain.pixels.max() == 255


def test_a_multi_frame_file_is_one_image_a_frame_grouped_by_its_file(tmp_path):
    ids = ["000", "001", "002", "100", "101", "102"]
    hu = ct_slices(ids)
    stacks = {"hemorrhage/series1.dcm": ids[:3], "normal/series2.dcm": ids[3:]}
    written = {name: write_ct(tmp_path / "set" / name, np.stack([hu[i] for i in group]), enhanced=True)
               for name, group in stacks.items()}
    spec = ImageFolderSource(source="imagefolder", root=str(tmp_path / "set"), image_size=SIDE, window="brain")
    items, skipped = scan_with_skips(spec)
    assert not skipped
    assert [it.key for it in items] == [f"hemorrhage/series1.dcm#{k:04d}" for k in range(3)] + \
        [f"normal/series2.dcm#{k:04d}" for k in range(3)]
    assert {it.group for it in items} == set(stacks)
    for it in items:
        name, k = it.key.split("#")
        d = decode_file(str(tmp_path / "set" / it.key), ImageSettings(SIDE, "pad", ((40.0, 80.0),)))
        assert np.array_equal(d.pixels, window_ref(written[name][int(k)], 40, 80)), it.key


def _nifti_set(root: Path, volumes: dict[str, tuple[str, list[str]]]) -> dict[str, np.ndarray]:
    """NIfTI volumes (int16 HU, slices along the third axis, an identity affine: RAS+ already) and a
    label table; returns each volume's HU array."""
    ids = [i for _, group in volumes.values() for i in group]
    hu = ct_slices(ids)
    out = {}
    rows = ["file,label"]
    for name, (label, group) in volumes.items():
        # the slice in the volume's (x, y) plane so that the canonical view (rotated anterior-up) is the PNG
        vol = np.stack([np.rot90(np.fliplr(hu[i]), k=-1) for i in group], axis=-1).astype(np.int16)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / name))
        out[name] = vol
        rows.append(f"{name},{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return out


def test_a_nifti_volume_is_sliced_and_its_slices_never_cross_splits(tmp_path, cache_dir):
    volumes = {f"vol{v:02d}.nii.gz": ("1" if v < 6 else "0", [f"{v * 3 + k:03d}" if v < 6 else f"{100 + v * 3 + k:03d}" for k in range(3)])
               for v in range(12)}
    vols = _nifti_set(tmp_path / "set", volumes)
    spec = CsvSource(source="csv", root=str(tmp_path / "set"), image_column="file", label_column="label",
                     classes={"normal": ["0"], "hemorrhage": ["1"]}, positive="hemorrhage", image_size=SIDE, window="brain",
                     split={"val": 0.25, "test": 0.25})
    d = decode_file(str(tmp_path / "set" / "vol00.nii.gz#0001"), ImageSettings(SIDE, "pad", ((40.0, 80.0),)))
    hu = ct_slices(["001"])["001"]
    assert d.error is None and d.mode == "NIfTI" and np.array_equal(d.pixels, window_ref(hu, 40, 80))
    ds = prepare("ct", spec, cache_dir)
    assert len(ds.keys) == 36 and ds.channels == 1
    split_of = {}
    for split, idx in ds.splits.items():
        for i in idx:
            split_of.setdefault(ds.keys[i].split("#")[0], set()).add(split)
    assert set(split_of) == set(vols) and all(len(s) == 1 for s in split_of.values()), split_of
    coronal = scan_with_skips(spec.model_copy(update={"slice_axis": "coronal"}))[0]
    assert len(coronal) == 12 * SIDE  # one image a row of the volumes' y axis


def test_dicom_patient_ids_group_the_split_and_files_without_an_extension_are_found(tmp_path, cache_dir):
    hu = ct_slices([f"{i:03d}" for i in range(12)] + [f"{i:03d}" for i in range(100, 112)])
    for n, (i, h) in enumerate(hu.items()):
        label = "hemorrhage" if int(i) < 100 else "normal"
        write_ct(tmp_path / "set" / label / (f"IM{n:04d}" if n % 2 else f"{i}.dcm"), h, patient=f"patient{n // 4}")
    (tmp_path / "set" / "normal" / "notes.txt").write_text("not an image")
    spec = ImageFolderSource(source="imagefolder", root=str(tmp_path / "set"), image_size=SIDE, window="brain",
                             positive="hemorrhage", split={"val": 0.25, "test": 0.25, "group_tag": "PatientID"})
    items, skipped = scan_with_skips(spec)
    assert len(items) == 24 and [s.key for s in skipped] == ["normal/notes.txt"]
    assert {it.group for it in items} == {f"patient{p}" for p in range(6)}
    ds = prepare("ct", spec, cache_dir)
    where = {}
    for split, idx in ds.splits.items():
        for i in idx:
            where.setdefault(ds.groups[i], set()).add(split)
    assert all(len(s) == 1 for s in where.values()), where
    with pytest.raises(ValueError, match="not a DICOM attribute keyword"):
        ImageFolderSource(source="imagefolder", root=str(tmp_path / "set"), split={"group_tag": "PatientName2"})


def test_a_series_saved_a_file_a_slice_is_one_group_and_extensionless_frames_decode(tmp_path):
    """A CT series as scanners export it (one file a slice, no extension, one SeriesInstanceUID) is one
    group; a DICOMDIR beside it is skipped, not read; a multi-frame file without an extension decodes."""
    hu = ct_slices(["000", "001", "002", "100"])
    for n, (i, h) in enumerate(hu.items()):
        write_ct(tmp_path / "set" / "a" / f"IM{n:04d}", h)
        import pydicom as pd

        ds = pd.dcmread(tmp_path / "set" / "a" / f"IM{n:04d}")
        ds.SeriesInstanceUID = "1.2.3.4" if n < 3 else "1.2.3.5"
        ds.save_as(tmp_path / "set" / "a" / f"IM{n:04d}", enforce_file_format=True)
    frames = write_ct(tmp_path / "set" / "b" / "MF0001", np.stack([hu["000"], hu["100"]]))
    write_ct(tmp_path / "set" / "b" / "IM0009", hu["001"])
    (tmp_path / "set" / "a" / "DICOMDIR").write_bytes((tmp_path / "set" / "a" / "IM0000").read_bytes())
    spec = ImageFolderSource(source="imagefolder", root=str(tmp_path / "set"), image_size=SIDE, window="brain")
    items, skipped = scan_with_skips(spec)
    assert [(s.key, "DICOMDIR" in s.detail) for s in skipped] == [("a/DICOMDIR", True)]
    assert {it.key: it.group for it in items if it.key.startswith("a/")} == {
        "a/IM0000": "1.2.3.4", "a/IM0001": "1.2.3.4", "a/IM0002": "1.2.3.4", "a/IM0003": "1.2.3.5"}
    assert [it.key for it in items if it.key.startswith("b/MF")] == ["b/MF0001#0000", "b/MF0001#0001"]
    d = decode_file(str(tmp_path / "set" / "b" / "MF0001#0001"), ImageSettings(SIDE, "pad", ((40.0, 80.0),)))
    assert d.error is None and np.array_equal(d.pixels, window_ref(frames[1], 40, 80))


def test_a_voi_lut_is_applied_and_a_nifti_slice_is_shown_as_radiologists_view_it(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    hu = write_ct(tmp_path / "x.dcm", ct_slices(["001"])["001"])
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    lut = Dataset()
    lut.add_new(0x00283002, "SS", [4096, -1024, 12])  # a LUT over -1024..3071 HU: 0 below 0 HU, 4095 above 255, linear
    table = np.clip((np.arange(-1024, 3072) - 0) * 16, 0, 4095).astype(np.uint16)
    lut.add_new(0x00283006, "OW", table.tobytes())  # as pydicom writes a LUT of more than one entry
    ds.VOILUTSequence = Sequence([lut])
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    d = decode_file(str(tmp_path / "x.dcm"), ImageSettings(SIDE, "pad"))
    expected = np.rint(np.clip(hu * 16, 0, 4095) * (255 / 4095)).astype(np.uint8)
    assert d.error is None and np.array_equal(d.pixels, expected)

    vol = np.full((20, 16, 3), -1000, np.int16)
    vol[15:, 5, 1] = 500  # bright on the patient's right (x high in RAS+), near the back (y low)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    img = decode_file(str(tmp_path / "v.nii#0001"), ImageSettings(20, "squash")).pixels
    ys, xs = np.nonzero(img > 128)
    assert img.shape == (20, 20) and xs.max() < 10 and ys.min() >= 10  # the right on the image's left, the back down
    mask = nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4))
    mask.header.set_intent("label")
    nib.save(mask, str(tmp_path / "v_seg.nii.gz"))
    assert "label map" in decode_file(str(tmp_path / "v_seg.nii.gz#0000"), ImageSettings(8, "pad")).error


def test_pixel_data_the_installed_pydicom_cannot_decode_names_the_package_to_install(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    write_ct(tmp_path / "a.dcm", ct_slices(["000"])["000"])
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # Pillow reads JPEG 2000 and baseline JPEG, not JPEG-LS
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jls.dcm", enforce_file_format=True)
    try:  # where a JPEG-LS plugin is installed, the made-up codestream fails to decode instead
        import libjpeg  # noqa: F401
        pytest.skip("pylibjpeg-libjpeg is installed here")
    except ImportError:
        pass
    d = decode_file(str(tmp_path / "jls.dcm"), ImageSettings(SIDE, "pad"))
    assert d.pixels is None and "\n" not in d.error
    assert "JPEG-LS" in d.error and "pip install pylibjpeg pylibjpeg-libjpeg" in d.error, d.error
    (tmp_path / "text.dcm").write_text("a report, not an image")
    assert "not a DICOM file" in decode_file(str(tmp_path / "text.dcm"), ImageSettings(SIDE, "pad")).error


def test_windows_are_checked_when_the_manifest_is_read(tmp_path):
    with pytest.raises(ValueError, match="give one, or three"):
        ImageFolderSource(source="imagefolder", root=str(tmp_path), window=["brain", "bone"])
    with pytest.raises(ValueError, match="three channels"):
        ImageFolderSource(source="imagefolder", root=str(tmp_path), window=["brain", "subdural", "bone"], channels=1)
    with pytest.raises(ValueError):
        ImageFolderSource(source="imagefolder", root=str(tmp_path), window={"level": 40, "width": 0})
    with pytest.raises(ValueError):
        ImageFolderSource(source="imagefolder", root=str(tmp_path), window="abdomen")
    spec = ImageFolderSource(source="imagefolder", root=str(tmp_path), window=["brain", {"level": 80, "width": 200}, "bone"])
    assert spec.windows == ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))


MANIFEST = """\
name: medical
datasets:
  ct_dicom:
    source: imagefolder
    root: {dicom}
    window: brain
    positive: hemorrhage
    image_size: 32
    split: {{val: 0.25, test: 0.25, group_tag: PatientID}}
  ct_nifti:
    source: csv
    root: {nifti}
    image_column: file
    label_column: label
    classes: {{normal: ['0'], hemorrhage: ['1']}}
    positive: hemorrhage
    window: brain
    image_size: 32
    split: {{val: 0.25, test: 0.25}}
methods: [byol-finetune, supervised]
labels: {{fractions: [1.0]}}
seeds: [0]
model: {{arch: resnet18}}
pretrain: {{epochs: 1, min_steps: 3, batch_size: 16, proj_hidden: 64, pred_hidden: 64, proj_dim: 32, warmup_epochs: 0}}
finetune: {{epochs: 1, min_steps: 3, batch_size: 16}}
run: {{device: cpu, progress_every_s: 0.5}}
executor: {{max_parallel: 2, retries: 0}}
"""


@pytest.mark.e2e
def test_a_dicom_and_a_nifti_version_of_the_head_ct_set_run_with_a_brain_window(tmp_path):
    hu = ct_slices([f"{i:03d}" for i in range(20)] + [f"{i:03d}" for i in range(100, 120)])
    for n, (i, h) in enumerate(hu.items()):
        write_ct(tmp_path / "dicom" / ("hemorrhage" if int(i) < 100 else "normal") / f"{i}.dcm", h, patient=f"p{n // 2}")
    _nifti_set(tmp_path / "nifti", {f"v{v:02d}.nii.gz": ("1" if v < 5 else "0", [f"{(v if v < 5 else v + 20) * 4 + k:03d}"
                                                                                    for k in range(4)]) for v in range(10)})
    manifest = tmp_path / "medical.yaml"
    manifest.write_text(MANIFEST.format(dicom=tmp_path / "dicom", nifti=tmp_path / "nifti"))
    audit = run_cli("data", "audit", str(manifest), "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    read = {name: d["medical"] for name, d in json.loads(audit.stdout)["datasets"].items()}
    assert read["ct_dicom"]["files"] == {"DICOM": 40} and read["ct_dicom"]["window"] == ["brain 40/80"]
    assert read["ct_dicom"]["group_tag"] == "PatientID" and read["ct_dicom"]["groups"] == 20
    assert read["ct_nifti"]["files"] == {"NIfTI": 10} and read["ct_nifti"]["images"] == {"NIfTI": 40}
    r = run_cli("run", str(manifest), "--results", str(tmp_path / "results"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 done" in r.stdout, r.stdout
    results = json.loads((tmp_path / "results" / "medical" / "results.json").read_text())
    assert {row["dataset"] for row in results["rows"]} == {"ct_dicom", "ct_nifti"}
    nifti_model = next(p for p in (tmp_path / "results" / "tasks").glob("*/model.pt")
                       if json.loads((p.parent / "task.json").read_text())["dataset"] == "ct_nifti")
    pred = run_cli("predict", nifti_model.parent.name[:8], str(tmp_path / "nifti" / "v00.nii.gz"),
                   "--results", str(tmp_path / "results"), "--json")
    assert pred.returncode == 0, pred.stdout + pred.stderr
    rows = json.loads(pred.stdout)["rows"]  # a volume is scored a slice at a time, as it was trained
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == ["0000", "0001", "0002", "0003"] and all(r["probs"] for r in rows)
