//! The services served beside batchd.v1: grpc.health.v1 reports SERVING, and reflection lists and
//! describes the service with the proto's documentation.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use prost::Message;
use support::*;
use tonic::Code;

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let server = TestServer::start(|_| {});
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel);
    for service in ["", "batchd.v1.BatchService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service is not reported as serving");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_and_describes_the_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::start(|_| {});
    let channel = server.channel().await;
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("batchd.v1.BatchService".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let listed = responses.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::ListServicesResponse(list)) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    let services: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(services.contains(&"batchd.v1.BatchService"), "{services:?}");

    let file = responses.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::FileDescriptorResponse(files)) = file else {
        panic!("expected file descriptors, got {file:?}");
    };
    let files: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(&b[..]).unwrap())
        .collect();
    let batchd = files
        .iter()
        .find(|f| f.package() == "batchd.v1")
        .expect("the batchd.v1 file");
    let service = batchd
        .service
        .iter()
        .find(|s| s.name() == "BatchService")
        .unwrap();
    let methods: Vec<_> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["Process", "RunBatch", "ListHandlers"]);
    // The proto's documentation reaches users through reflection.
    let documented = batchd.source_code_info.as_ref().map_or(0, |info| {
        info.location
            .iter()
            .filter(|l| !l.leading_comments().trim().is_empty())
            .count()
    });
    assert!(
        documented > 20,
        "only {documented} documented elements in the reflected descriptor"
    );
    drop(responses);
}
