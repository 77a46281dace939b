"""DICOM copies of synthetic slides: a real DICOM WSI series (one VL Whole Slide Microscopy Image file a level).

The JPEG tiles of the SVS are copied byte for byte (no re-encoding), so the copy holds exactly the SVS's
pixels and a test can compare the two bit for bit. wsidicomizer, the usual converter, is not used: its
newest release for Python 3.11 (0.26.1) pins wsidicom < 0.32 and PyTurboJPEG < 2, and its direct (opentile)
path needs the system libturbojpeg.
"""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless, VLWholeSlideMicroscopyImageStorage, generate_uid

JPEG = 7  # TIFF compression tag value


def write_dicom_copy(svs: Path, out_dir: Path, mpp: float, codec: str = "jpeg") -> list[Path]:
    """Write ``out_dir/level_<i>.dcm`` for each pyramid level of ``svs`` (JPEG-tiled, no JPEGTables); returns the files.

    ``mpp`` is the level-0 resolution, written as each level's DICOM pixel spacing. ``codec`` "jpeg" copies
    the tiles; "jpeg-ls" stores their decoded pixels losslessly as JPEG-LS, a transfer syntax OpenSlide
    does not read (the case the wsidicom backend is there for).
    """
    if codec not in ("jpeg", "jpeg-ls"):
        raise ValueError(f"codec must be jpeg or jpeg-ls, got {codec!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
    files = []
    with tifffile.TiffFile(svs) as tiff:
        pages = [p for p in tiff.pages if p.is_tiled]
        width0 = pages[0].imagewidth
        for level, page in enumerate(pages):
            if page.compression != JPEG or page.jpegtables is not None:
                raise ValueError(f"{svs}: level {level} is not self-contained JPEG tiles; only such slides can be copied")
            frames = []
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                tiff.filehandle.seek(offset)
                frames.append(tiff.filehandle.read(count))
            if codec == "jpeg-ls":
                frames = [imagecodecs.jpegls_encode(imagecodecs.jpeg8_decode(frame)) for frame in frames]
            spacing_mm = mpp * width0 / page.imagewidth / 1000.0
            path = out_dir / f"level_{level}.dcm"
            _level_dataset(page, frames, spacing_mm, level, uids, codec).save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def _level_dataset(page: tifffile.TiffPage, frames: list[bytes], spacing_mm: float, level: int, uids: dict,
                   codec: str) -> Dataset:
    """A TILED_FULL VL WSI instance with the given JPEG or JPEG-LS frames (row-major tiles)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if codec == "jpeg" else JPEGLSLossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for key, value in uids.items():
        setattr(ds, key, value)
    image_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.update(_attributes(
        ImageType=image_type, Modality="SM", Manufacturer="pathomics tests", PatientName="Synthetic^Slide", PatientID="synthetic",
        StudyDate="20260101", StudyTime="000000", ContentDate="20260101", ContentTime="000000", AcquisitionDateTime="20260101000000",
        AccessionNumber="", ReferringPhysicianName="", StudyID="1", SeriesNumber=1, InstanceNumber=level + 1,
        PatientBirthDate="", PatientSex="", PositionReferenceIndicator="SLIDE_CORNER", ContainerIdentifier="synthetic",
        IssuerOfTheContainerIdentifierSequence=Sequence(), ContainerTypeCodeSequence=Sequence([_code("433466003", "SCT", "Microscope slide")]),
        SpecimenDescriptionSequence=Sequence([Dataset()]), DimensionOrganizationType="TILED_FULL",
        VolumetricProperties="VOLUME", SpecimenLabelInImage="NO", BurnedInAnnotation="NO", FocusMethod="AUTO",
        ExtendedDepthOfField="NO", TotalPixelMatrixFocalPlanes=1, NumberOfOpticalPaths=1,
        ImageOrientationSlide=[0, -1, 0, -1, 0, 0], LossyImageCompression="01", LossyImageCompressionMethod="ISO_10918_1",
        SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL_422" if codec == "jpeg" else "RGB", PlanarConfiguration=0, BitsAllocated=8, BitsStored=8,
        HighBit=7, PixelRepresentation=0, Rows=page.tilelength, Columns=page.tilewidth,
        TotalPixelMatrixColumns=page.imagewidth, TotalPixelMatrixRows=page.imagelength, NumberOfFrames=len(frames),
        ImagedVolumeWidth=page.imagewidth * spacing_mm, ImagedVolumeHeight=page.imagelength * spacing_mm, ImagedVolumeDepth=0.001,
    ))
    ds.SpecimenDescriptionSequence[0].update(_attributes(SpecimenIdentifier="synthetic", SpecimenUID=generate_uid(),
                                                         IssuerOfTheSpecimenIdentifierSequence=Sequence(),
                                                         SpecimenPreparationSequence=Sequence()))
    ds.TotalPixelMatrixOriginSequence = Sequence([_attributes(XOffsetInSlideCoordinateSystem=20.0, YOffsetInSlideCoordinateSystem=40.0)])
    ds.OpticalPathSequence = Sequence([_attributes(
        OpticalPathIdentifier="0", IlluminationColorCodeSequence=Sequence([_code("414298005", "SCT", "Full Spectrum")]),
        IlluminationTypeCodeSequence=Sequence([_code("111744", "DCM", "Brightfield illumination")]))])
    measures = _attributes(PixelSpacing=[spacing_mm, spacing_mm], SliceThickness=0.001, SpacingBetweenSlices=0.001)
    ds.SharedFunctionalGroupsSequence = Sequence([_attributes(
        PixelMeasuresSequence=Sequence([measures]),
        WholeSlideMicroscopyImageFrameTypeSequence=Sequence([_attributes(FrameType=image_type)]))])
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    return ds


def _attributes(**values: object) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _attributes(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def write_non_wsi_dicom(path: Path) -> Path:
    """A small valid DICOM image that is not a whole-slide image (an 8x8 secondary capture), for error tests."""
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = _attributes(SOPClassUID=SecondaryCaptureImageStorage, SOPInstanceUID=meta.MediaStorageSOPInstanceUID,
                     StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), Modality="OT", PatientID="x",
                     Rows=8, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=8,
                     BitsStored=8, HighBit=7, PixelRepresentation=0, PixelData=np.zeros((8, 8), np.uint8).tobytes())
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path
