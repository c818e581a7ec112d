//! Tenants in the config: templates only where a tenant can fill them,
//! tenants files checked with file:line:col, and each tenant's view of a
//! source and feed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;

use tidemark_core::config::{RateScope, load_str, load_tenants_str, tenant_vars_used, validate};
use tidemark_core::tenant::Tenant;

const TENANTED: &str = r#"sources:
  helpdesk:
    base_url: "https://{tenant}.helpdesk.example/{vars.region}"
    auth: { bearer: "${file:/run/secrets/helpdesk/{tenant}}" }
    headers: { X-Account: "{tenant}" }
    rate_limit: { per_second: 10 }
    tenants:
      file: tenants.yaml
      list:
        - { name: inline-one, vars: { region: eu } }
feeds:
  - name: tickets
    source: helpdesk
    path: /api/{vars.region}/tickets.json
    params: { account: "{tenant}", filter: '{"status":"open"}' }
    pagination: { preset: zendesk_cursor }
    records: /tickets
    key: /id
"#;

fn errors(text: &str) -> Vec<String> {
    load_str("feeds.yaml", text)
        .expect_err("must be rejected")
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn a_tenanted_source_fills_every_template_for_each_tenant() {
    let config = load_str("feeds.yaml", TENANTED).expect("valid");
    let source = &config.sources["helpdesk"];
    assert!(source.is_tenanted());
    assert_eq!(
        source.rate_scope(),
        RateScope::Tenant,
        "the default for tenants"
    );
    assert_eq!(source.limit_key("helpdesk", Some("acme")), "helpdesk/acme");
    let acme = Tenant::new("acme").with_var("region", "us");
    let s = source.for_tenant(&acme).expect("acme's source");
    assert_eq!(
        s.base_url.url().expect("a URL").as_str(),
        "https://acme.helpdesk.example/us"
    );
    let bearer = s
        .auth
        .as_ref()
        .and_then(|a| a.bearer.as_ref())
        .expect("bearer");
    assert_eq!(bearer.template(), "${file:/run/secrets/helpdesk/acme}");
    assert_eq!(s.headers["X-Account"].template(), "acme");
    let f = config.feeds[0].for_tenant(&acme).expect("acme's feed");
    assert_eq!(f.path, "/api/us/tickets.json");
    assert_eq!(f.params["account"], "acme");
    assert_eq!(
        f.params["filter"], r#"{"status":"open"}"#,
        "other braces are text"
    );
    // The template itself is not a URL a request can use.
    assert!(source.base_url.url().is_err());
    let used = tenant_vars_used(&config, "helpdesk");
    assert_eq!(used.keys().collect::<Vec<_>>(), vec!["region"]);
    assert!(
        source.for_tenant(&Tenant::new("bare")).is_err(),
        "a tenant without vars.region cannot fill the base URL"
    );
}

#[test]
fn templates_stand_only_where_a_tenant_can_fill_them() {
    let misplaced = TENANTED.replace("key: /id", "key: /id\n    version: /{tenant}");
    let e = errors(&misplaced);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].contains("feeds[0].version"), "{}", e[0]);
    assert!(e[0].contains("{tenant} cannot stand here"), "{}", e[0]);
    assert!(e[0].starts_with("feeds.yaml:"), "{}", e[0]);

    let untenanted = r#"sources:
  plain:
    base_url: https://api.example
feeds:
  - { name: t, source: plain, path: "/x/{vars.zone}", pagination: { preset: zendesk_cursor }, records: /tickets, key: /id }
"#;
    let e = errors(untenanted);
    assert!(
        e[0].contains("feeds[0].path") && e[0].contains("has no tenants"),
        "{e:#?}"
    );

    let per_tenant = "sources:\n  plain:\n    base_url: https://api.example\n    rate_limit: { per_second: 1, per: tenant }\n";
    let e = errors(per_tenant);
    assert!(e[0].contains("rate_limit.per"), "{e:#?}");

    let missing_var = TENANTED.replace("vars: { region: eu }", "vars: { zone: eu }");
    let e = errors(&missing_var);
    assert!(
        e.iter()
            .any(|x| x.contains("tenants.list[0]") && x.contains("no vars.region")),
        "{e:#?}"
    );

    let bad_name = TENANTED.replace("name: inline-one", "name: Inline/One");
    let e = errors(&bad_name);
    assert!(e.iter().any(|x| x.contains("may hold only a-z")), "{e:#?}");
}

#[test]
fn a_tenants_file_is_checked_with_file_line_and_column() {
    let used: BTreeMap<String, String> = [(
        "region".to_string(),
        "sources.helpdesk.base_url".to_string(),
    )]
    .into();
    let good = "# accounts\n- name: acme\n  vars: { region: eu }\n- { name: globex, vars: { region: us } }\n";
    let list = load_tenants_str("tenants.yaml", good, &used).expect("valid");
    assert_eq!(
        list.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        vec!["acme", "globex"]
    );
    let bad = "- name: acme\n  vars: { region: eu }\n- name: Bad.Name\n  vars: { region: eu }\n- name: acme\n  vars: { region: us }\n- name: initech\n";
    let e: Vec<String> = load_tenants_str("tenants.yaml", bad, &used)
        .expect_err("rejected")
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[0].starts_with("tenants.yaml:3:3: [1]:"), "{}", e[0]);
    assert!(
        e[1].starts_with("tenants.yaml:5:3: [2]:") && e[1].contains("listed twice"),
        "{}",
        e[1]
    );
    assert!(
        e[2].starts_with("tenants.yaml:7:3: [3]:") && e[2].contains("no vars.region"),
        "{}",
        e[2]
    );
    let unknown = "- { name: a, token: x }\n";
    let e = load_tenants_str("tenants.yaml", unknown, &BTreeMap::new()).expect_err("rejected");
    assert!(e.to_string().contains("unknown field `token`"), "{e}");
    assert!(
        load_tenants_str("t.yaml", "# none yet\n", &used)
            .expect("empty")
            .is_empty()
    );
}

#[test]
fn the_inline_list_passes_validation_and_plain_configs_are_unchanged() {
    let config = load_str("feeds.yaml", TENANTED).expect("valid");
    assert!(validate(&config).is_empty());
    let plain = load_str(
        "f.yaml",
        "sources:\n  a:\n    base_url: https://api.example/v1\nfeeds: []\n",
    )
    .expect("valid");
    let a = &plain.sources["a"];
    assert!(!a.is_tenanted());
    assert_eq!(a.rate_scope(), RateScope::Source);
    assert_eq!(a.limit_key("a", None), "a");
    assert_eq!(
        a.base_url.url().expect("url").as_str(),
        "https://api.example/v1"
    );
}

#[test]
fn templates_fill_a_body_for_each_tenant_and_each_parent() {
    let text = r#"sources:
  api:
    base_url: "https://api.example"
    tenants: { list: [ { name: acme, vars: { org: acme-inc } } ] }
feeds:
  - name: repos
    source: api
    path: /graphql
    method: POST
    read_only: true
    body:
      query: "{ organization(login: \"{vars.org}\") { repositories { nodes { name } } } }"
      variables: { account: "{tenant}", tags: ["{tenant}", 7] }
    records: /data/organization/repositories/nodes
    key: /name
    pagination: { cursor_param: "body:/variables/after", next_cursor: /data/organization/repositories/pageInfo/endCursor }
  - name: issues
    source: api
    parent: { feed: repos, vars: { repo: /name } }
    path: /graphql
    method: POST
    read_only: true
    body:
      query: "{ repository(name: \"{repo}\") { issues { nodes { id } } } }"
    records: /data/repository/issues/nodes
    key: /id
    pagination: { cursor_param: "body:/variables/after", next_cursor: /data/repository/issues/pageInfo/endCursor }
    mode: snapshot
"#;
    let cfg = load_str("feeds.yaml", text).unwrap();
    assert_eq!(
        tenant_vars_used(&cfg, "api").keys().collect::<Vec<_>>(),
        ["org"]
    );
    let acme = Tenant {
        name: "acme".into(),
        vars: BTreeMap::from([("org".to_string(), "acme-inc".to_string())]),
    };
    let repos = cfg.feeds[0].for_tenant(&acme).unwrap();
    let body = repos.body.unwrap();
    assert_eq!(
        body["query"],
        "{ organization(login: \"acme-inc\") { repositories { nodes { name } } } }"
    );
    assert_eq!(body["variables"]["account"], "acme");
    assert_eq!(body["variables"]["tags"], serde_json::json!(["acme", 7]));
    // A child's {name} fills the body too; GraphQL's own braces stay.
    let vars = BTreeMap::from([("repo".to_string(), "tidemark".to_string())]);
    let issues = tidemark_core::child::fill(&cfg.feeds[1], &vars).unwrap();
    assert_eq!(
        issues.body.unwrap()["query"],
        "{ repository(name: \"tidemark\") { issues { nodes { id } } } }"
    );
    // A template in the body of a source without tenants is refused.
    let untenanted = text.replace(
        "    tenants: { list: [ { name: acme, vars: { org: acme-inc } } ] }\n",
        "",
    );
    let errs = errors(&untenanted);
    assert!(
        errs.iter()
            .any(|e| e.contains("feeds[0].body.query") && e.contains("has no tenants")),
        "{errs:#?}"
    );
}
