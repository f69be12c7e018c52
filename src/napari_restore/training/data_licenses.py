"""The licences of the public data the shipped models were trained on, written out for a MONAI
bundle's ``docs/data_licenses.md`` (standard licence texts filled with each source's copyright line;
nothing is read from the data folders).

A source is matched by its repository name in a card's ``training_data`` line, e.g.
``"... (from neurolabusc/dcm_qa_ct @ d03e30e (BSD-2-Clause, Chris Rorden))"``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DataSource:
    """A public repository of training data: its SPDX licence, copyright line and address."""

    name: str
    spdx: str
    copyright: str
    url: str


SOURCES = (
    DataSource("dcm_qa_ct", "BSD-2-Clause", "Copyright (c) 2019, Chris Rorden", "https://github.com/neurolabusc/dcm_qa_ct"),
    DataSource("dcm_qa_uih", "BSD-2-Clause", "Copyright (c) 2018, Chris Rorden", "https://github.com/neurolabusc/dcm_qa_uih"),
    DataSource("dcm_qa_xa30", "BSD-2-Clause", "Copyright (c) 2022, Chris Rorden",
               "https://github.com/neurolabusc/dcm_qa_xa30"),
    DataSource("VolumeRenderingData", "MIT", "Copyright (c) 2020 Chris Rorden",
               "https://github.com/neurolabusc/VolumeRenderingData"),
    DataSource("pydicom-data", "MIT", "Copyright (c) 2020 Dicom in Python", "https://github.com/pydicom/pydicom-data"),
    DataSource("TotalSegmentator", "Apache-2.0", "Copyright Jakob Wasserthal and the TotalSegmentator contributors",
               "https://github.com/wasserth/TotalSegmentator"),
)

_BSD_2 = """BSD 2-Clause License

{copyright}
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE."""

_MIT = """MIT License

{copyright}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""

_APACHE_2 = """Apache License, Version 2.0

{copyright}

Licensed under the Apache License, Version 2.0 (the "License"); you may not
use these files except in compliance with the License. You may obtain a copy
of the License at

    https://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
License for the specific language governing permissions and limitations
under the License."""

_CLAUSE_3 = """3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.

"""
_BSD_3 = _BSD_2.replace("BSD 2-Clause License", "BSD 3-Clause License").replace(
    "THIS SOFTWARE IS PROVIDED", _CLAUSE_3 + "THIS SOFTWARE IS PROVIDED")

#: Standard licence texts by SPDX id; ``{copyright}`` is the copyright line.
TEMPLATES = {"BSD-2-Clause": _BSD_2, "BSD-3-Clause": _BSD_3, "MIT": _MIT, "Apache-2.0": _APACHE_2}


def licence_text(source: DataSource) -> str:
    """The licence of ``source`` with its copyright line (Apache-2.0: the standard notice and address)."""
    return TEMPLATES[source.spdx].format(copyright=source.copyright)


def sources_named(lines: list[str]) -> list[DataSource]:
    """The known sources that the card's ``training_data`` lines name (by repository name)."""
    return [s for s in SOURCES if any(re.search(rf"/{re.escape(s.name)}\b", line) for line in lines)]
