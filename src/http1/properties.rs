//! Properties of the codec as a whole: a byte stream parses the same however it is split
//! into reads, and mutated input never panics and never yields two framings of one message.

use bytes::BytesMut;

use super::*;

/// What a stream of requests parsed into; adjacent data pieces are joined, since how a
/// body is cut into pieces depends on the reads.
#[derive(Debug, PartialEq)]
enum Event {
    Head {
        method: String,
        target: String,
        fields: Vec<(String, Vec<u8>)>,
        framing: BodyFraming,
        keep_alive: bool,
    },
    Data(Vec<u8>),
    Trailers(Vec<(String, Vec<u8>)>),
    End,
    Refused(String),
}

fn fields_of(map: &hyper::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// Feeds `reads` one after another as a connection would, parsing heads and bodies as far
/// as each read allows.
fn drive(reads: &[&[u8]]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    let mut heads = HeadReader::new(8 * 1024);
    let mut body: Option<BodyDecoder> = None;
    let push = |events: &mut Vec<Event>, event: Event| match (events.last_mut(), event) {
        (Some(Event::Data(joined)), Event::Data(more)) => joined.extend_from_slice(&more),
        (_, event) => events.push(event),
    };
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            if let Some(decoder) = body.as_mut() {
                match decoder.decode(&mut buf) {
                    Ok(Some(Decoded::Data(d))) => push(&mut events, Event::Data(d.to_vec())),
                    Ok(Some(Decoded::Trailers(t))) => {
                        push(&mut events, Event::Trailers(fields_of(&t)))
                    }
                    Ok(Some(Decoded::End)) => {
                        push(&mut events, Event::End);
                        body = None;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        push(&mut events, Event::Refused(e.to_string()));
                        return events;
                    }
                }
                continue;
            }
            match heads.request(&mut buf) {
                Ok(Some(head)) => {
                    body = Some(BodyDecoder::new(head.framing));
                    push(
                        &mut events,
                        Event::Head {
                            method: head.method.to_string(),
                            target: head.uri.to_string(),
                            fields: fields_of(&head.headers),
                            framing: head.framing,
                            keep_alive: head.keep_alive,
                        },
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    push(&mut events, Event::Refused(e.to_string()));
                    return events;
                }
            }
        }
    }
    events
}

const PIPELINE: &[u8] = b"GET /a HTTP/1.1\r\nHost: api.example.com\r\n\r\n\
POST /upload?x=1 HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: 11\r\n\r\nhello world\
PUT /c HTTP/1.1\r\nHost: files.example.com\r\nTransfer-Encoding: chunked\r\n\r\n\
5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\n\r\n\
GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
DELETE /d HTTP/1.0\r\nHost: api.example.com\r\n\r\n";

#[test]
fn the_pipeline_parses_into_five_requests() {
    let events = drive(&[PIPELINE]);
    let heads = events
        .iter()
        .filter(|e| matches!(e, Event::Head { .. }))
        .count();
    assert_eq!(heads, 5);
    assert!(events.contains(&Event::Data(b"hello world".to_vec())));
    assert!(events.contains(&Event::Data(b"helloabcdefghijklmnopqrstuvwxyz".to_vec())));
    assert!(events.contains(&Event::Trailers(vec![("x-sum".into(), b"1".to_vec())])));
    assert_eq!(events.iter().filter(|e| **e == Event::End).count(), 5);
}

#[test]
fn every_split_into_two_reads_parses_as_one_read_does() {
    let whole = drive(&[PIPELINE]);
    for at in 0..=PIPELINE.len() {
        let (a, b) = PIPELINE.split_at(at);
        assert_eq!(drive(&[a, b]), whole, "split at {at}");
    }
}

#[test]
fn random_splits_into_many_reads_parse_as_one_read_does() {
    let whole = drive(&[PIPELINE]);
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..500 {
        let reads = random_split(&mut rng, PIPELINE);
        let reads: Vec<&[u8]> = reads.iter().map(Vec::as_slice).collect();
        assert_eq!(drive(&reads), whole);
    }
    // One byte per read: the slowest client.
    let bytes: Vec<&[u8]> = PIPELINE.chunks(1).collect();
    assert_eq!(drive(&bytes), whole);
}

fn random_split(rng: &mut fastrand::Rng, bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut reads = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let take = rng.usize(1..=rest.len().min(40));
        let (read, more) = rest.split_at(take);
        reads.push(read.to_vec());
        rest = more;
    }
    reads
}

/// Pieces a mutation splices in: the bytes framing and line ends are made of.
const SPLICES: &[&[u8]] = &[
    b"\r",
    b"\n",
    b"\0",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"0",
    b"7",
    b"f",
    b"-",
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"content-length:  5 \r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"transfer-encoding: chunked, chunked\r\n",
    b"Connection: close\r\n",
    b" folded\r\n",
    b"\x7f",
    b"\xff",
];

fn mutate(rng: &mut fastrand::Rng, base: &[u8]) -> Vec<u8> {
    let mut bytes = base.to_vec();
    for _ in 0..rng.usize(1..=3) {
        let at = rng.usize(..=bytes.len());
        match rng.u8(..4) {
            0 if at < bytes.len() => {
                bytes.remove(at);
            }
            1 if at < bytes.len() => {
                let splice = SPLICES[rng.usize(..SPLICES.len())];
                bytes[at] = splice[0];
            }
            _ => {
                let splice = SPLICES[rng.usize(..SPLICES.len())];
                bytes.splice(at..at, splice.iter().copied());
            }
        }
    }
    bytes
}

/// An accepted head carries one way to frame its body at most.
fn assert_one_framing(events: &[Event], input: &[u8]) {
    for event in events {
        let Event::Head {
            fields, framing, ..
        } = event
        else {
            continue;
        };
        let lengths = fields.iter().filter(|(n, _)| n == "content-length").count();
        let codings: Vec<_> = fields
            .iter()
            .filter(|(n, _)| n == "transfer-encoding")
            .collect();
        let shown = String::from_utf8_lossy(input);
        assert!(lengths <= 1, "two lengths accepted: {shown:?}");
        assert!(
            lengths == 0 || codings.is_empty(),
            "length and coding accepted: {shown:?}"
        );
        if let Some((_, value)) = codings.first() {
            assert!(
                codings.len() == 1 && value.eq_ignore_ascii_case(b"chunked"),
                "{shown:?}"
            );
            assert_eq!(*framing, BodyFraming::Chunked, "{shown:?}");
        }
    }
}

#[test]
fn mutated_streams_never_panic_and_never_frame_a_message_two_ways() {
    let mut rng = fastrand::Rng::with_seed(16);
    for _ in 0..20_000 {
        let input = mutate(&mut rng, PIPELINE);
        let whole = drive(&[&input]);
        assert_one_framing(&whole, &input);
        // However the mutated stream is cut into reads, it is read the same way.
        let reads = random_split(&mut rng, &input);
        let reads: Vec<&[u8]> = reads.iter().map(Vec::as_slice).collect();
        assert_eq!(
            drive(&reads),
            whole,
            "{:?}",
            String::from_utf8_lossy(&input)
        );
    }
}

#[test]
fn mutated_responses_never_panic() {
    let base: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhelloHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let mut rng = fastrand::Rng::with_seed(9);
    for _ in 0..20_000 {
        let input = mutate(&mut rng, base);
        let mut buf = BytesMut::from(&input[..]);
        let mut heads = HeadReader::new(8 * 1024);
        while let Ok(Some(head)) = heads.response(&mut buf, &hyper::Method::GET) {
            let mut body = BodyDecoder::new(head.framing);
            loop {
                match body.decode(&mut buf) {
                    Ok(Some(Decoded::End)) | Ok(None) | Err(_) => break,
                    Ok(Some(_)) => {}
                }
            }
            if !body.is_done() {
                break;
            }
        }
    }
}
