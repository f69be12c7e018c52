"""The napari side of napari-restore: the only package that imports napari or Qt.

Contributions are declared in ``napari_restore/napari.yaml`` (npe2): the reader
(:mod:`._reader`), the writers (:mod:`._writer`) and the sample data (:mod:`._sample_data`).
"""
