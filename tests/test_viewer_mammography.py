"""The viewer's mammography layout API (``GET /api/view/mammography``) on each
index backend: each of the four standard views is the image whose own
ImageLaterality / Laterality and ViewPosition / View Code Sequence say so
(never its order, InstanceNumber or SeriesDescription), FOR PRESENTATION and
the latest exposure win, a missing view is null, the mirroring follows
Patient Orientation so that the chest walls face each other; the woman's
prior rounds come from her regional identity -- another site, another
local ID -- each filtered by the caller's scope.

The adversaries: another site's technician (404, audited as denied, the
same answer as a study that does not exist), a site user who must not see
the other site's round, a reader whose group was not given the prior, a
share link of the current study (no prior), malformed study UIDs (400).

The world (tests/mammo_world.py) is stored through the real ingest pipeline
and the identity subscriber runs on a real job worker."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from pydicom.uid import generate_uid

from archive.priors import same_person_studies
from archive.security.principals import Principals
from tests.inprocess import serving_in_process
from tests.mammo_world import (
    EXPECTED,
    IMAGES,
    ROUNDS,
    SETTINGS,
    VIEWS,
    World,
    X,
    Y,
    build,
    rendered,
)
from viewer_api.mammography import flip_for

SECRET_FORM = re.compile(r"/share/([A-Za-z0-9_-]{43})$")


@pytest.fixture(scope="module")
def index_url(module_index_url: str) -> str:
    return module_index_url


@pytest.fixture(scope="module")
def world(index_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("imag")
    with serving_in_process(workdir, settings=SETTINGS, index_url=index_url) as server:
        yield build(server)


def shown(world: World, round_: dict) -> dict[str, tuple[str, bool] | None]:
    """view -> (the test's name of the image shown, mirrored?) of a round."""
    return {
        view: (world.key_of(cell["instance"]), cell["flip"]) if cell else None
        for view, cell in round_["views"].items()
    }


def test_each_view_is_the_image_whose_own_attributes_say_so(world: World) -> None:
    answer = world.layout("l2")
    assert answer.status_code == 200, answer.text
    current = answer.json()["current"]
    assert list(current["views"]) == list(VIEWS)
    # stored shuffled; InstanceNumbers and SeriesDescriptions point elsewhere
    assert shown(world, current) == EXPECTED["2026"]
    rcc = current["views"]["RCC"]
    assert (rcc["study"], rcc["rows"], rcc["columns"], rcc["frames"]) == (
        world.studies["2026"],
        160,
        120,
        1,
    )
    assert rcc["presentation_intent"] == "FOR PRESENTATION"
    assert rcc["url"] == (
        f"/api/view/studies/{world.studies['2026']}/instances/{rcc['instance']}/frames/1/image"
    )
    # the decoys: a FOR PROCESSING twin acquired later, an earlier LMLO, an ML view
    chosen = {cell["instance"] for cell in current["views"].values()}
    for decoy in ("2026-RCC-processing", "2026-LMLO-first", "2026-RML"):
        assert world.sops[decoy] not in chosen


def test_the_image_shown_can_be_fetched_at_its_url(world: World) -> None:
    rcc = world.layout("l2").json()["current"]["views"]["RCC"]
    image = world.get("l2", rcc["url"] + "?viewport=120,160")
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/jpeg"


def test_laterality_and_projection_fall_back_to_the_series_and_the_view_code(
    world: World,
) -> None:
    [prior, older] = world.layout("l2").json()["priors"]
    # 2024: the RMLO says its breast only in Laterality, the LCC its view only in a code
    assert shown(world, prior) == EXPECTED["2024"]
    assert shown(world, older) == EXPECTED["2022"]


def test_a_missing_view_is_null(world: World) -> None:
    older = world.layout("l2").json()["priors"][1]
    assert older["views"]["LMLO"] is None
    assert all(older["views"][view] is not None for view in ("RCC", "LCC", "RMLO"))


def test_the_mirroring_puts_each_chest_wall_toward_the_middle() -> None:
    # rows toward P: the right edge is the chest wall, right for a right breast
    assert flip_for("R", ["P", "L"]) is False and flip_for("R", ["P", "FL"]) is False
    assert flip_for("R", ["A", "L"]) is True and flip_for("R", ["A", "FL"]) is True
    # a left breast's chest wall belongs on the left: rows toward A
    assert flip_for("L", ["A", "R"]) is False and flip_for("L", ["A", "FR"]) is False
    assert flip_for("L", ["P", "R"]) is True and flip_for("L", ["P", "FR"]) is True
    # nothing known, nothing done
    for side, orientation in (("R", []), ("L", ["", ""]), ("R", ["F", "L"]), ("", ["A", "R"])):
        assert flip_for(side, orientation) is False


def test_the_womans_rounds_at_another_site_under_another_local_id_are_priors_newest_first(
    world: World,
) -> None:
    body = world.layout("l2").json()
    assert body["patient"] == {"name": "DE VINCI RUTH", "birth_date": "19790315"}
    rounds = [body["current"], *body["priors"]]
    assert [(r["study_uid"], r["date"], r["site"], r["description"]) for r in rounds] == [
        (world.studies[key], ROUNDS[key][3], ROUNDS[key][0], ROUNDS[key][4])
        for key in ("2026", "2024", "2022")
    ]
    # neither her CT nor another woman's mammogram is a round
    listed = {r["study_uid"] for r in rounds}
    assert world.ct_study not in listed and world.stranger_study not in listed
    # the 2024 round's own answer lists the two others
    older = world.layout("l2", "2024").json()
    assert [r["study_uid"] for r in older["priors"]] == [
        world.studies["2026"],
        world.studies["2022"],
    ]


def test_the_archive_lists_the_same_person_studies_for_every_service(world: World) -> None:
    archive = world.archive
    others = same_person_studies(archive.db, archive.identity, world.studies["2026"])
    # every study of hers, whatever the modality, newest first; not the stranger's
    assert [(s["study_uid"], s["study_date"], s["site"]) for s in others] == [
        (world.ct_study, "20250101", X),
        (world.studies["2024"], "20240305", Y),
        (world.studies["2022"], "20220301", X),
    ]
    assert others[1]["modalities"] == ["MG"] and others[1]["instances"] == 4
    with_self = same_person_studies(
        archive.db, archive.identity, world.studies["2026"], include_self=True
    )
    assert with_self[0]["study_uid"] == world.studies["2026"] and with_self[1:] == others
    assert same_person_studies(archive.db, archive.identity, generate_uid()) == []


def test_another_sites_user_gets_404_audited_as_denied_like_a_missing_study(
    world: World,
) -> None:
    last = world.last_audit()
    answer = world.layout("manip.y")
    assert answer.status_code == 404
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert "RUTH" not in answer.text and world.studies["2024"] not in answer.text
    entries = [e[:5] for e in world.audit_since(last) if e[0] == "manip.y"]
    assert entries == [("manip.y", "viewer.mammography", "denied", 404, world.studies["2026"])]
    missing = world.get("manip.y", f"/api/view/mammography?study={generate_uid()}")
    assert missing.status_code == 404 and missing.json()["title"] == answer.json()["title"]


def test_a_site_user_never_sees_the_other_sites_round(world: World) -> None:
    body = world.layout("manip.x").json()
    assert shown(world, body["current"]) == EXPECTED["2026"]
    assert [r["study_uid"] for r in body["priors"]] == [world.studies["2022"]]
    assert world.studies["2024"] not in json.dumps(body)
    # and site Y's user, on its own round, sees nothing of site X's
    own = world.layout("manip.y", "2024").json()
    assert own["priors"] == [] and shown(world, own["current"]) == EXPECTED["2024"]


def test_a_reader_sees_a_prior_only_once_it_is_routed_to_their_group(world: World) -> None:
    principals = Principals(world.archive.db)
    principals.grant_group("L2-OTHER", [world.studies["2026"]])
    try:
        assert world.layout("l2.other").json()["priors"] == []
        principals.grant_group("L2-OTHER", [world.studies["2024"]])
        last = world.last_audit()
        body = world.layout("l2.other").json()
        assert [r["study_uid"] for r in body["priors"]] == [world.studies["2024"]]
        [entry] = [e for e in world.audit_since(last) if e[0] == "l2.other"]
        assert entry[1:5] == ("viewer.mammography", "allowed", 200, world.studies["2026"])
        assert json.loads(entry[5])["priors"] == [world.studies["2024"]]  # the audit names it
    finally:
        principals.revoke_group("L2-OTHER", [world.studies["2026"], world.studies["2024"]])
    assert world.layout("l2.other").status_code == 404


def test_a_share_link_of_the_current_study_shows_its_views_and_no_prior(world: World) -> None:
    made = requests.post(
        world.url + "/api/shares",
        json={"study_uid": world.studies["2026"]},
        headers={"Authorization": f"Bearer {world.tokens['manip.x']}"},
        timeout=30,
    )
    assert made.status_code == 201, made.text
    secret = SECRET_FORM.search(made.json()["url"]).group(1)  # type: ignore[union-attr]
    opened = requests.get(f"{world.url}/share/{secret}", allow_redirects=False, timeout=30)
    assert opened.status_code == 303
    cookie = {"Cookie": f"imag_share={opened.cookies['imag_share']}"}
    for path in ("/api/view/mammography", f"/api/view/mammography?study={world.studies['2026']}"):
        body = requests.get(world.url + path, headers=cookie, timeout=30)
        assert body.status_code == 200, body.text
        assert shown(world, body.json()["current"]) == EXPECTED["2026"]
        assert body.json()["priors"] == []
    # the link names one study: another one named in the URL is not it
    other = requests.get(
        f"{world.url}/api/view/mammography?study={world.studies['2022']}",
        headers=cookie,
        timeout=30,
    )
    assert other.status_code in (400, 404) and "RUTH" not in other.text


@pytest.mark.parametrize("asked", ["1.2.abc", "1.2..3", "1.2.3\\1.2.4", "9" * 65, "*", "1.2.3%00"])
def test_a_malformed_study_uid_is_a_400_problem_and_one_audit_entry(
    world: World, asked: str
) -> None:
    last = world.last_audit()
    answer = world.get("l2", "/api/view/mammography", params={"study": asked})
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert answer.json()["status"] == 400 and "UID" in answer.json()["detail"]
    entries = [e for e in world.audit_since(last) if e[0] == "l2"]
    assert [e[1:4] for e in entries] == [("viewer.mammography", "failed", 400)]


def test_no_study_named_is_a_400_problem(world: World) -> None:
    answer = world.get("l2", "/api/view/mammography")
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")


def test_the_views_of_a_round_are_told_apart_as_shown_and_from_their_mirror() -> None:
    """The browser test's comparisons mean something only if this holds:
    each view as shown differs from the other views of its round as shown,
    and from itself mirrored, by far more than the browser test's tolerance."""
    by_key = {image.key: image for image in IMAGES}
    for views in EXPECTED.values():
        shown_ = {
            key: rendered(by_key[key], flip=flip).astype(float)
            for key, flip in (v for v in views.values() if v is not None)
        }
        for key, image in shown_.items():
            assert np.abs(image - image[:, ::-1]).mean() > 40, key
            for other, pixels in shown_.items():
                if other != key:
                    assert np.abs(image - pixels).mean() > 12, (key, other)


@pytest.mark.parametrize("layout", ["mammography", "", "other", "../viewer"])
def test_the_layout_parameter_chooses_the_page_and_nothing_else(world: World, layout: str) -> None:
    answer = requests.get(world.url + "/share/view", params={"layout": layout}, timeout=30)
    assert answer.status_code == 200
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    scripts = re.findall(r'<script\b[^>]*src="([^"]+)"', answer.text)
    assert len(re.findall(r"<script\b", answer.text)) == len(scripts)  # nothing inline
    page = "mammography" if layout == "mammography" else "viewer"
    assert scripts == [f"/share/static/{page}.js"]
    linked = re.findall(r'(?:src|href)="(/share/static/[^"]+)"', answer.text)
    for path in linked:
        body = requests.get(world.url + path, timeout=30).text
        assert not re.search(
            r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/",
            body.replace('xmlns="http://www.w3.org/2000/svg"', ""),
            re.I,
        )
