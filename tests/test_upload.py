"""Upload path: validation gates the upload; Kaggle errors are explained. A fake API stands in."""

import gzip
from types import SimpleNamespace

import pytest

from carvana.data.sources import kaggle_client as kc
from carvana.data.layout import COMPETITION
from carvana.submission.validate import SubmissionError, main, upload_submission

NAMES = ["car0_01.jpg", "car0_02.jpg"]


class FakeApi:
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def competition_submit(self, file_name, message, competition):
        if self.error:
            raise self.error
        self.calls.append((file_name, message, competition))
        return SimpleNamespace(message="Successfully submitted")


def write(path, rows):
    with gzip.open(path, "wt", newline="") as f:
        f.write("img,rle_mask\n" + "".join(f"{n},{r}\n" for n, r in rows))
    return path


def test_valid_submission_is_uploaded_with_its_message(tmp_path):
    sub = write(tmp_path / "submit.csv.gz", [(NAMES[0], "1 5"), (NAMES[1], "")])
    api = FakeApi()
    assert upload_submission(sub, NAMES, "unet v1", api=api).message == "Successfully submitted"
    assert api.calls == [(str(sub), "unet v1", COMPETITION)]


def test_invalid_submission_is_never_sent(tmp_path):
    sub = write(tmp_path / "submit.csv.gz", [(NAMES[0], "1 5")])  # a row missing
    api = FakeApi()
    with pytest.raises(SubmissionError, match="(?s)not uploading.*missing.*car0_02.jpg"):
        upload_submission(sub, NAMES, "m", api=api)
    assert api.calls == []


def test_rules_not_accepted_is_explained(tmp_path):
    sub = write(tmp_path / "submit.csv.gz", [(NAMES[0], "1 5"), (NAMES[1], "")])
    http403 = RuntimeError("403 Client Error: Forbidden")
    http403.response = SimpleNamespace(status_code=403)
    with pytest.raises(kc.KaggleRulesNotAcceptedError, match="rules"):
        upload_submission(sub, NAMES, "m", api=FakeApi(http403))


def test_cli_upload_without_credentials_says_what_to_set(tmp_path, kaggle_home, capsys):
    sub = write(tmp_path / "submit.csv.gz", [(NAMES[0], "1 5"), (NAMES[1], "")])
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("img,rle_mask\n" + "".join(f"{n},1 1\n" for n in NAMES))
    assert main(["upload", str(sub), "--sample-submission", str(sample), "-m", "x"]) == 1
    assert "KAGGLE_USERNAME" in capsys.readouterr().err
