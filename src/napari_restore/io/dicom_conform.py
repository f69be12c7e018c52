"""Keep derived DICOM datasets valid when their source is not.

Sources carry values their IOD does not allow (``PatientAge = "0Y"``, dates masked as ``***``,
hexadecimal "UIDs", an empty SpecificCharacterSet, a Laterality where the body part is unpaired).
A derived series copies the source's patient, study and series attributes, so it would copy the
errors too. :func:`conform` repairs what was copied:

* a value that pydicom's VR validation rejects is emptied (Type 2 attributes) or removed;
* an invalid Study/Frame of Reference UID becomes a ``2.25.`` UID derived from it (the same for
  every series of that study, so they stay together);
* an empty or unknown SpecificCharacterSet is removed (the default repertoire applies);
* empty sequences are removed (no Type 1 or 2 sequence is written empty);
* ``PatientIdentityRemoved = YES`` without a method gets a DeidentificationMethod that says so.

:func:`safe_deidentified_description` names a de-identified series by what was done to it, not
by the source's (possibly identifying) description (PS3.15 E.3.5: descriptions are removed unless
the Clean Descriptors Option is used).
"""
from __future__ import annotations

import hashlib
from typing import Any

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

#: Type 2 attributes of the modules we write: emptied, never removed, when invalid.
TYPE2 = {
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "PatientPosition", "Laterality",
    "PositionReferenceIndicator", "AcquisitionNumber", "KVP", "InstanceNumber",
}
#: the VRs whose copied text is checked
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
#: UIDs that tie the series to its study and patient space: replaced, not dropped, when invalid.
_KEPT_UIDS = ("StudyInstanceUID", "FrameOfReferenceUID")


def valid_value(vr: str, value: Any) -> bool:
    """Whether pydicom's validation accepts ``value`` for ``vr`` (every item of a multi-value)."""
    values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    try:
        for v in values:
            validate_value(vr, v, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def valid_uid(uid: Any) -> bool:
    """A non-empty UID that pydicom accepts and whose root is 0, 1 or 2 (ISO, ITU-T or joint)."""
    text = str(uid or "")
    return bool(text) and valid_value("UI", text) and text.split(".")[0] in ("0", "1", "2")


def derived_uid(uid: str) -> str:
    """A valid UID (``2.25.<128 bits>``) derived from an invalid one; the same input, the same output."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(("napari-restore:" + str(uid)).encode()).digest()[:16], "big"))


def _known_charset(term: str) -> bool:
    from pydicom.charset import python_encoding

    return term.strip() in python_encoding or term.strip() in ("", "ISO 2022 IR 6")


def conform(ds: Dataset, unpaired_body_part: bool) -> Dataset:
    """Repair the copied attributes of ``ds`` in place (see the module docstring); returns it."""
    cs = ds.get("SpecificCharacterSet")
    if cs is not None:
        terms = [str(t) for t in (cs if isinstance(cs, (list, tuple)) or type(cs).__name__ == "MultiValue" else [cs])]
        if not any(t.strip() for t in terms) or not all(_known_charset(t) for t in terms):
            del ds.SpecificCharacterSet
    for kw in _KEPT_UIDS:
        if kw in ds and str(ds.get(kw) or "") and not valid_uid(ds.get(kw)):
            setattr(ds, kw, derived_uid(kw + str(ds.get(kw))))
    if "FrameOfReferenceUID" in ds and str(ds.get("FrameOfReferenceUID")) == str(ds.get("StudyInstanceUID", "")):
        ds.FrameOfReferenceUID = derived_uid("FrameOfReferenceUID" + str(ds.FrameOfReferenceUID))
    _drop_invalid(ds, top=True)
    if unpaired_body_part and "Laterality" in ds:
        del ds.Laterality  # Type 2C: not permitted for an unpaired body part
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
            ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")):
        ds.DeidentificationMethod = "not recorded by the source"
    return ds


def _drop_invalid(ds: Dataset, top: bool) -> None:
    for elem in list(ds):
        if elem.VR == "SQ":
            items = list(elem.value or [])
            for item in items:
                _drop_invalid(item, top=False)
            if not items:
                del ds[elem.tag]
            continue
        if elem.value is None or elem.value == "" or elem.VR not in _TEXT_VRS:
            continue  # numbers (DS, IS, US...) are written by pydicom from values it parsed
        if not valid_value(elem.VR, elem.value):
            if top and elem.keyword in TYPE2:
                elem.value = ""
            else:
                del ds[elem.tag]


def drop_empty_sequences(ds: Dataset) -> Dataset:
    """Remove the top-level sequences with no items (a de-identification's ``Z`` on a sequence)."""
    for elem in list(ds):
        if elem.VR == "SQ" and not elem.value:
            del ds[elem.tag]
    return ds


def safe_deidentified_description(meta: dict[str, Any]) -> str:
    """``"denoise denoise-ct-25d, de-identified"``: the steps and models of the provenance."""
    steps = [s for s in (meta.get("provenance") or []) if isinstance(s, dict) and s.get("task")]
    parts = [f"{s.get('task')} {s.get('model')}".strip() if s.get("model") else str(s.get("task")) for s in steps]
    text = ", ".join(dict.fromkeys(parts)) or "napari-restore"
    return (text + ", de-identified")[:64]
