//! Unit tests of `xml.rs`, kept apart because the test server includes that file.

use crate::xml::*;

#[test]
fn parses_prefixed_soap_with_entities() {
    let doc = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:rsp="x">
  <s:Body><rsp:ReceiveResponse>
<rsp:Stream Name="stdout" CommandId="A&amp;B">aGk=</rsp:Stream>
<rsp:Stream Name="stderr" End="true"/>
<rsp:Text>a &lt;b&gt; &#65;<![CDATA[<c>]]></rsp:Text>
  </rsp:ReceiveResponse></s:Body></s:Envelope>"#;
    let root = parse(doc).unwrap();
    assert_eq!(root.name, "Envelope");
    let resp = root.path(&["Body", "ReceiveResponse"]).unwrap();
    let streams: Vec<_> = resp.children_named("Stream").collect();
    assert_eq!(streams.len(), 2);
    assert_eq!(streams[0].attr("CommandId"), Some("A&B"));
    assert_eq!(streams[0].trimmed_text(), "aGk=");
    assert_eq!(streams[1].attr("End"), Some("true"));
    assert_eq!(resp.child("Text").unwrap().text, "a <b> A<c>");
    assert!(parse("<a><b></a>").is_err());
    assert!(parse("<a>").is_err());
    assert_eq!(escape("<'&\">"), "&lt;&apos;&amp;&quot;&gt;");
}
