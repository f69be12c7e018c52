"""Write many DICOM files that share most of their elements, encoding the shared ones once.

A derived series is one template dataset (patient, study, series, equipment, image pixel
module...) plus a handful of elements per slice (SOP Instance UID, position, source reference,
pixels). ``pydicom.dcmwrite`` re-encodes every element of every file; :class:`SharedElementWriter`
encodes an element of the template once and reuses its bytes in each file whose dataset holds
that very element object (``pydicom.Dataset(template)`` shares them), encoding only the others.
The bytes are those ``pydicom.dcmwrite(path, ds, enforce_file_format=True)`` writes (Explicit VR
Little Endian, preamble, file meta): each element is encoded by pydicom's own
``write_data_element``, in tag order, after pydicom's ambiguous-VR correction.
"""
from __future__ import annotations

import os
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian


class SharedElementWriter:
    """Writes datasets made from ``template`` (``pydicom.Dataset(template)`` plus their own elements)
    as Explicit VR Little Endian DICOM files; the file meta names the dataset's SOP class and
    instance and ``implementation_version_name``.

    The template must not change while files are written: a per-file value goes in a new element
    of the file's dataset (assign it after deleting the shared one), never into a shared element.
    As a safeguard, a shared element whose VR or value (a sequence: which list, how many items)
    differs from what was encoded is encoded again.
    """

    def __init__(self, template: Dataset, implementation_version_name: str | None = None):
        self._version_name = implementation_version_name
        self._encodings = template.get("SpecificCharacterSet", None)
        self._shared: dict[BaseTag, tuple[Any, Any, bytes]] = {}
        probe = Dataset(template)
        correct_ambiguous_vr(probe, True)  # what pydicom does to every dataset it writes
        for tag in probe.keys():
            elem = template._dict[tag]
            self._shared[tag] = (elem, _snapshot(elem), self._encode(elem, self._encodings))

    @staticmethod
    def _encode(elem: Any, encodings: Any) -> bytes:
        """One element, Explicit VR Little Endian, strings in ``encodings`` (a SpecificCharacterSet value)."""
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_data_element(buf, elem, encodings)
        return buf.getvalue()

    def encode(self, ds: Dataset) -> bytes:
        """The file ``ds`` makes: preamble, file meta (SOP class and instance from ``ds``), data set."""
        encodings = ds.get("SpecificCharacterSet", None)
        reuse = encodings == self._encodings  # shared bytes hold the template's character set
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if self._version_name:
            meta.ImplementationVersionName = self._version_name
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        parts = [head.getvalue()]
        own = Dataset()
        for tag, elem in ds._dict.items():
            shared = self._shared.get(tag)
            if not reuse or shared is None or shared[0] is not elem or _snapshot(elem) != shared[1]:
                own._dict[tag] = ds[tag]  # a raw element is decoded, as pydicom's writer does
        fresh = set(own._dict)
        if fresh:
            for key in ("BitsAllocated", "PixelRepresentation", "PhotometricInterpretation"):
                if key in ds and key not in own:  # what the ambiguous-VR correction reads
                    own[key] = ds[key]
            correct_ambiguous_vr(own, True)
        for tag in sorted(ds._dict):
            if tag.element == 0 and tag.group > 6:  # retired group lengths: pydicom skips them
                continue
            parts.append(self._encode(own._dict[tag], encodings) if tag in fresh else self._shared[tag][2])
        return b"".join(parts)

    def write(self, path: str | os.PathLike, ds: Dataset) -> None:
        """Write the file ``ds`` makes at ``path`` (which must not exist yet)."""
        data = self.encode(ds)
        with open(path, "xb") as fh:
            fh.write(data)


def _snapshot(elem: Any) -> Any:
    """What an element's bytes depend on besides its tag: VR and value (sequences: their identity)."""
    value = elem.value
    if elem.VR == "SQ":
        return (elem.VR, id(value), len(value))
    if isinstance(value, list) or type(value).__name__ == "MultiValue":
        return (elem.VR, tuple(value))
    return (elem.VR, value)


__all__ = ["SharedElementWriter"]
