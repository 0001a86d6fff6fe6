"""Person names as fuzzy matching compares them: upper case, no accents.

PS3.18 lets a QIDO-RS client ask for ``fuzzymatching=true``; for the French
names of the region that means accent-insensitive matching -- ``*cote*`` must
find CÔTÉ, ``MUL*`` must find MÜLLER.  The index keeps a *folded* copy of each
name (``patients.patient_name_fold``, ``studies.referring_physician_name_fold``)
next to the upper-cased one, filled at ingest and by migration 0016/0017 for
existing rows, and the query value is folded the same way; so both prefix
matching (a b-tree range) and contains matching (pg_trgm) use indexes.

**One definition, two implementations.**  :func:`fold` is applied in Python
at ingest and to query values, and as the SQL function ``imag_fold`` by the
migrations that back-fill existing rows (a Python function registered on every
SQLite connection, a SQL function on PostgreSQL built from the same table).
So the fold is a plain character table, not Unicode normalisation, which
PostgreSQL cannot do without an extension: each upper-case Latin letter with
diacritics (Latin-1, Latin Extended-A/B, Vietnamese) becomes its base letter;
Œ and Æ become OE and AE; apostrophes are dropped and hyphens become spaces
(N'DIAYE is found as NDIAYE, SAINT-JEAN as SAINT JEAN).  It works on the
upper-cased form (:func:`archive.index.catalog.normalise_pn`), which Python
computes at ingest: PostgreSQL's ``upper()`` depends on the database locale.
"""

from __future__ import annotations

#: upper-case letters with diacritics and the base letter of each
FOLD_FROM = (
    "ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝĀĂĄĆĈĊČĎĐĒĔĖĘĚĜĞĠĢĤĦĨĪĬĮİĴĶĹĻĽŁŃ"
    "ŅŇŌŎŐŔŖŘŚŜŞŠŢŤŦŨŪŬŮŰŲŴŶŸŹŻŽƉƠƯǍǏǑǓǕǗǙǛǞǠǦǨǪǬǴǸǺȀȂȄȆȈȊȌȎȐȒȔȖȘ"
    "ȚȞȦȨȪȬȮȰȲḀḂḄḆḈḊḌḎḐḒḔḖḘḚḜḞḠḢḤḦḨḪḬḮḰḲḴḶḸḺḼḾṀṂṄṆṈṊṌṎṐṒṔṖṘṚṜṞṠṢṤ"
    "ṦṨṪṬṮṰṲṴṶṸṺṼṾẀẂẄẆẈẊẌẎẐẒẔẠẢẤẦẨẪẬẮẰẲẴẶẸẺẼẾỀỂỄỆỈỊỌỎỐỒỔỖỘỚỜỞỠỢỤỦ"
    "ỨỪỬỮỰỲỴỶỸ"
)
FOLD_TO = (
    "AAAAAACEEEEIIIIDNOOOOOOUUUUYAAACCCCDDEEEEEGGGGHHIIIIIJKLLLLN"
    "NNOOORRRSSSSTTTUUUUUUWYYZZZDOUAIOUUUUUAAGKOOGNAAAEEIIOORRUUS"
    "THAEOOOOYABBBCDDDDDEEEEEFGHHHHHIIKKKLLLLMMMNNNNOOOOPPRRRRSSS"
    "SSTTTTUUUUUVVWWWWWXXYZZZAAAAAAAAAAAAEEEEEEEEIIOOOOOOOOOOOOUU"
    "UUUUUYYYY"
)
#: dropped
FOLD_DELETE = "'\u2019"
#: one character that becomes two (PostgreSQL's translate() maps one to one)
FOLD_EXPAND = (("Œ", "OE"), ("Æ", "AE"))
_TABLE = str.maketrans(FOLD_FROM + "-", FOLD_TO + " ", FOLD_DELETE)


def fold(norm: str | None) -> str | None:
    """The folded form of an upper-cased name (None stays None)."""
    if norm is None:
        return None
    out = norm.translate(_TABLE)
    for one, two in FOLD_EXPAND:
        out = out.replace(one, two)
    return out
