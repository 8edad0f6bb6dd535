import boto3


def test_moto_server_serves_s3(aws_env: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="fixture-check")
    s3.put_object(Bucket="fixture-check", Key="k", Body=b"v")
    assert s3.get_object(Bucket="fixture-check", Key="k")["Body"].read() == b"v"
