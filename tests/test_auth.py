"""JWT on POST /infer (HS256, exp required, audience ml-service, previous secret accepted) and the
refusal to start without a real secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import aiohttp
import jwt
import pytest

from consumer.auth import PLACEHOLDER_SECRET, issue_token, verify_token
from consumer.errors import AuthError
from consumer.service import Service
from schemas.errors import ErrorCode
from tests.conftest import PREVIOUS_SECRET, SECRET, EventLog, job_id


def test_tokens_verify_only_with_the_right_secret_audience_and_expiry() -> None:
    assert verify_token(issue_token(SECRET), [SECRET])["aud"] == "ml-service"
    assert verify_token(issue_token(PREVIOUS_SECRET), [SECRET, PREVIOUS_SECRET])["sub"] == "ml-service"
    cases = {
        ErrorCode.TOKEN_INVALID: [
            issue_token("x" * 40),
            jwt.encode({"aud": "ml-service"}, SECRET, algorithm="HS256"),  # no exp
            jwt.encode({"aud": "other", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
            jwt.encode({"aud": "ml-service", "exp": int(time.time()) + 60}, None, algorithm="none"),
            "not.a.jwt",
        ],
        ErrorCode.TOKEN_EXPIRED: [issue_token(SECRET, ttl_s=-120)],
    }
    for code, tokens in cases.items():
        for token in tokens:
            with pytest.raises(AuthError) as info:
                verify_token(token, [SECRET])
            assert info.value.code is code, token


async def test_infer_refuses_bad_tokens_before_anything_happens(service: Service, job_events: EventLog) -> None:
    url = f"http://127.0.0.1:{service.settings.http_port}/infer"
    expired = issue_token(SECRET, ttl_s=-120)
    no_exp = jwt.encode({"aud": "ml-service"}, SECRET, algorithm="HS256")
    wrong = issue_token("another-secret-of-enough-length-0123456789")
    cases = [
        ({}, ErrorCode.UNAUTHORIZED),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, ErrorCode.UNAUTHORIZED),
        ({"Authorization": f"Bearer {expired}"}, ErrorCode.TOKEN_EXPIRED),
        ({"Authorization": f"Bearer {no_exp}"}, ErrorCode.TOKEN_INVALID),
        ({"Authorization": f"Bearer {wrong}"}, ErrorCode.TOKEN_INVALID),
    ]
    jobs = []
    async with aiohttp.ClientSession() as session:
        for headers, code in cases:
            job = job_id()
            jobs.append(job)
            body = {"job_uuid": job, "input_object": f"uploads/{job}/scan.nii.gz"}
            async with session.post(url, json=body, headers=headers) as response:
                assert response.status == 401, (headers, await response.text())
                assert (await response.json())["error"]["code"] == code
        # A token signed with the previous secret still works during a rotation (the object is
        # missing, so the job itself ends in 404: it ran).
        job = job_id()
        body = {"job_uuid": job, "input_object": f"uploads/{job}/missing.nii.gz"}
        headers = {"Authorization": f"Bearer {issue_token(PREVIOUS_SECRET)}"}
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 404
    await job_events.final(job)
    # Any event of a refused request would have been published before its answer: read them all.
    await job_events.caught_up()
    assert not any(j in job_events.by_job for j in jobs), "a refused request started a job"


@pytest.mark.parametrize("secret", ["", PLACEHOLDER_SECRET])
def test_serve_refuses_to_start_without_a_real_secret(secret: str) -> None:
    env = {**os.environ, "ML_SERVICE_TOKEN": secret, "ML_ALLOW_INSECURE": "0", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "refusing to start" in done.stderr and "ML_ALLOW_INSECURE" in done.stderr


def test_token_command_prints_a_token_the_service_accepts() -> None:
    env = {**os.environ, "ML_SERVICE_TOKEN": SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "token", "--ttl", "60"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    claims = verify_token(done.stdout.strip(), [SECRET])
    assert 0 < claims["exp"] - time.time() <= 61
