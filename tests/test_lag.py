"""Group members from a describe-groups answer (a plain fake of the admin client: pure decoding)."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from consumer.transport.lag import GroupMember, PartitionLag, group_members


class FakeAdmin:
    def __init__(self, groups: list[tuple]) -> None:  # type: ignore[type-arg]
        self.groups = groups

    async def describe_consumer_groups(self, group_ids: list[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(groups=self.groups)]


async def test_members_and_their_partitions_are_decoded() -> None:
    assignment = ConsumerProtocolMemberAssignment(0, [("ml.jobs", [2, 0]), ("minio.events", [1])], b"").encode()
    admin = FakeAdmin(
        [(0, "ml-service", "Stable", "consumer", "range", [("m-1", "ml-service", "/10.0.0.7", b"", assignment)])]
    )
    members = await group_members(admin, "ml-service")  # type: ignore[arg-type]
    assert members == [GroupMember("m-1", "ml-service", "/10.0.0.7", ["ml.jobs[0]", "ml.jobs[2]", "minio.events[1]"])]


async def test_a_group_the_broker_cannot_describe_gives_none() -> None:
    assert await group_members(FakeAdmin([(16, "ml-service", "", "", "", [])]), "ml-service") is None  # type: ignore[arg-type]


def test_lag_without_a_commit_counts_from_the_log_start() -> None:
    assert PartitionLag("t", 0, None, start=40, end=50).lag == 10
    assert PartitionLag("t", 0, 45, start=40, end=50).lag == 5
    assert PartitionLag("t", 0, 60, start=40, end=50).lag == 0  # a commit past a truncated log
