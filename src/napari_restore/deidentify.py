"""De-identified DICOM export: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

The attribute list is not hand-written: it is DICOM PS3.15 Table E.1-1 (standard release 2026c) as
shipped, generated from the standard's own tables, by the ``dicom-anonymizer`` package
(KitwareMedical, BSD-3; ``dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py``).
We use only its table and apply the action codes ourselves, because a consistent export needs
state that the package keeps in a module-level global: one :class:`Deidentifier` holds a secret
key from which every replacement UID, the pseudonymous PatientID and the date shift are derived.

Action codes (PS3.15 E.1.1, Table E.1-1) as applied here:

* ``X`` remove; ``Z`` empty (PatientName and PatientID get a dummy, which Z allows);
  ``D`` a dummy of the same VR; ``U`` a replacement UID, the same for the same source UID;
* combined codes keep the element when it is there (``X/Z`` -> Z, ``X/D`` and ``Z/D`` -> D,
  ``X/Z/D`` -> Z, ``X/Z/U*`` -> U for UIDs else Z), so Type 2 attributes stay present;
* dates and date-times: with ``dates="remove"`` (the basic profile) they are emptied or removed;
  with ``dates="shift"`` (Retain Longitudinal Temporal Information with Modified Dates Option,
  code 113107) every DA/DT value of a ``D``/``Z`` attribute moves back by the same number of days;
* every private element is removed (Retain Safe Private Option off), and so are overlays and
  curves (groups 60xx and 50xx); descriptions are removed as the table says (Clean Descriptors
  Option off);
* PatientIdentityRemoved = YES, DeidentificationMethod and DeidentificationMethodCodeSequence
  (113100 Basic Application Confidentiality Profile, plus 113107 when dates are shifted),
  LongitudinalTemporalInformationModified = REMOVED or MODIFIED.

Consistency: the same source UID always maps to the same new UID under one key (``2.25.`` + the
first 128 bits of HMAC-SHA256(key, uid), a UUID-derived UID as in PS3.5 B.2), so series of one
study exported with one :class:`Deidentifier` (or with the same key in another session) keep one
StudyInstanceUID and FrameOfReferenceUID. The key is random unless the caller gives one; keep it
secret, since whoever holds it can check a guessed source UID against the export.

Pixel data is not inspected: a source that says ``BurnedInAnnotation = YES`` is refused unless the
caller accepts it (:func:`check_burned_in`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import OutputError

#: the Annex E table release used (a module of ``dicomanonymizer.dicom_anonymization_databases``)
TABLE_RELEASE = "dicomfields_2026c"
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
_DUMMY = "ANONYMIZED"
_MAX_LEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UT": 2**20, "UC": 2**20,
            "AS": 4}
_ACTIONS: dict[tuple[int, int], str] | None = None


def annex_e_actions() -> dict[tuple[int, int], str]:
    """``{(group, element): action}`` of PS3.15 Table E.1-1 (``X``, ``Z``, ``D``, ``U``, ``X/Z``, ...)."""
    global _ACTIONS
    if _ACTIONS is None:
        try:
            from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise OutputError(f"de-identification needs the 'dicom-anonymizer' package ({exc})") from None
        table = dicom_anonymization_database_selector(TABLE_RELEASE)
        names = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
                 "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
        actions: dict[tuple[int, int], str] = {}
        for category, code in names.items():
            for tag in table[category]:
                if len(tag) == 2:  # (group, element); entries with masks (e.g. 50xx) are handled by group
                    actions[(int(tag[0]), int(tag[1]))] = code
        _ACTIONS = actions
    return _ACTIONS


class Deidentifier:
    """Applies the basic profile with one consistent UID map, pseudonym and date shift.

    Pass one instance to several exports (``save(v, p, format="dicom", deidentify=d)``) so that
    series of one study keep one StudyInstanceUID and FrameOfReferenceUID; or pass the same
    ``key`` in another session to get the same mapping again.

    Args:
        key: secret bytes or text from which UIDs, the PatientID pseudonym and the date shift
            are derived; default: 32 random bytes (then the mapping lives only in this object).
        dates: ``"remove"`` (basic profile: dates emptied or removed) or ``"shift"`` (every date
            moved back by the same whole number of days, 1 to 3650, derived from the key).
        date_shift_days: the shift to use with ``dates="shift"`` instead of the derived one.
    """

    def __init__(self, key: bytes | str | None = None, *, dates: str = "remove",
                 date_shift_days: int | None = None):
        if dates not in ("remove", "shift"):
            raise ValueError(f"dates must be 'remove' or 'shift', got {dates!r}")
        if key is None:
            key = secrets.token_bytes(32)
        self._key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        if not self._key:
            raise ValueError("the de-identification key must not be empty")
        self.dates = dates
        derived = int.from_bytes(self._digest(b"date-shift"), "big") % 3650 + 1
        self.date_shift_days = int(date_shift_days) if date_shift_days is not None else derived
        self.uid_map: dict[str, str] = {}

    # ------------------------------------------------------------------ mapping
    def _digest(self, value: bytes) -> bytes:
        return hmac.new(self._key, value, hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """The replacement of ``uid`` (``2.25.<128-bit integer>``); the same input, the same output."""
        uid = str(uid).strip().rstrip("\x00")
        if not uid:
            return ""
        new = self.uid_map.get(uid)
        if new is None:
            new = "2.25." + str(int.from_bytes(self._digest(b"uid:" + uid.encode("ascii", "replace"))[:16], "big"))
            self.uid_map[uid] = new
        return new

    def pseudonym(self, value: str) -> str:
        """A stable pseudonymous identifier for ``value`` (at most 16 characters, fits SH and LO)."""
        return "ANON" + self._digest(b"id:" + str(value).encode("utf-8", "replace")).hex()[:12].upper()

    def shift_date(self, value: str) -> str:
        """A DA (``YYYYMMDD``) or DT value moved back by :attr:`date_shift_days`; empty if unparsable."""
        text = str(value).strip()
        try:
            day = _dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            return ""
        shifted = (day - _dt.timedelta(days=self.date_shift_days)).strftime("%Y%m%d")
        return shifted + text[8:]

    # ------------------------------------------------------------------ applying
    def apply(self, ds) -> Any:
        """De-identify a pydicom Dataset in place (file meta excluded); returns it."""
        actions = annex_e_actions()
        original_id = str(ds.get("PatientID", "") or "")
        self._clean(ds, actions)
        ds.PatientName = "Anonymous^"
        ds.PatientID = self.pseudonym(original_id)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = ["PS3.15 E.1.1 Basic Application Confidentiality Profile",
                                     "napari-restore; Annex E table " + TABLE_RELEASE.removeprefix("dicomfields_")]
        codes = [BASIC_PROFILE_CODE] + ([MODIFIED_DATES_CODE] if self.dates == "shift" else [])
        ds.DeidentificationMethodCodeSequence = [_code(v, m) for v, m in codes]
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.dates == "shift" else "REMOVED"
        return ds

    def _clean(self, ds, actions: dict[tuple[int, int], str]) -> None:
        for elem in list(ds):
            tag = elem.tag
            group = tag.group
            if tag.is_private or (group & 0xFF00) in (0x5000, 0x6000) or group == 0xFFFA:
                del ds[tag]  # private elements, curves, overlays, digital signatures
                continue
            action = actions.get((group, tag.element))
            if action is None:
                if elem.VR == "SQ":
                    for item in elem.value or []:
                        self._clean(item, actions)
                continue
            self._act(ds, elem, action)

    def _act(self, ds, elem, action: str) -> None:
        vr = elem.VR
        if action == "X":
            del ds[elem.tag]
            return
        if action == "X/Z/U*" and vr == "SQ":  # keep the references, replace the UIDs inside them
            for item in elem.value or []:
                self._clean(item, annex_e_actions())
            return
        if action == "U" or (action == "X/Z/U*" and vr == "UI"):
            if elem.VM > 1:
                elem.value = [self.uid(u) for u in elem.value]
            else:
                elem.value = self.uid(elem.value) if elem.value else elem.value
            return
        if vr in ("DA", "DT", "TM"):
            if self.dates == "shift":  # whole-day shifts: dates move, times stay
                if vr != "TM" and elem.value:
                    values = elem.value if elem.VM > 1 else [elem.value]
                    elem.value = [self.shift_date(v) for v in values] if elem.VM > 1 else self.shift_date(values[0])
            elif "X" in action:
                del ds[elem.tag]
            else:
                elem.value = ""
            return
        if action in ("D", "Z/D", "X/D"):
            elem.value = _dummy(elem)
        else:  # Z, X/Z, X/Z/D, X/Z/U* (not a UID)
            elem.value = [] if vr == "SQ" else None if vr in _NUMERIC_VRS else ""

    def check_burned_in(self, header, accept: bool, where: str | os.PathLike | None = None) -> None:
        """See :func:`check_burned_in`."""
        check_burned_in(header, accept, where)


_NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def _dummy(elem) -> Any:
    vr = elem.VR
    if vr == "SQ":
        return []
    if vr in ("IS", "DS"):
        return "0"
    if vr in _NUMERIC_VRS:
        return None
    if vr == "UI":
        return ""
    text = _DUMMY if vr != "PN" else "Anonymous^"
    return text[: _MAX_LEN.get(vr, 64)]


def _code(value: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def check_burned_in(header, accept: bool, where: str | os.PathLike | None = None) -> None:
    """Refuse a de-identified export of a source whose pixels carry burned-in text.

    Raises:
        OutputError: ``header`` says ``BurnedInAnnotation = YES`` and ``accept`` is False.
    """
    if header is None:
        return
    value = str(header.get("BurnedInAnnotation", "") or "").strip().upper()
    if value == "YES" and not accept:
        raise OutputError("the source says BurnedInAnnotation=YES: its pixels may show identifying text, which "
                          "de-identification cannot remove; pass accept_burned_in=True (--accept-burned-in) "
                          "to export anyway", None if where is None else Path(where))


def as_deidentifier(value: "bool | Deidentifier | str | bytes | None") -> Deidentifier | None:
    """``True`` -> a new :class:`Deidentifier`; a Deidentifier as is; text/bytes -> one with that key."""
    if value is None or value is False:
        return None
    if value is True:
        return Deidentifier()
    if isinstance(value, Deidentifier):
        return value
    if isinstance(value, (str, bytes)):
        return Deidentifier(key=value)
    raise TypeError(f"deidentify must be a bool, a Deidentifier or a key, got {type(value).__name__}")


__all__ = ["Deidentifier", "check_burned_in", "as_deidentifier", "annex_e_actions", "TABLE_RELEASE"]
