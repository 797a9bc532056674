package infermesh.residency_test

import rego.v1

import data.infermesh.residency

eu_dc := {"id": "eu", "endpoint": {"site_id": "eu-dc", "jurisdiction": "EU", "certifications": ["iso27001", "hipaa"]}}

eu_edge := {"id": "eu-edge", "endpoint": {"site_id": "eu-edge", "jurisdiction": "EU", "certifications": []}}

us_dc := {"id": "us", "endpoint": {"site_id": "us-dc", "jurisdiction": "US", "certifications": ["hipaa"]}}

req(jurisdictions, data_class) := {
	"request": {"allowed_jurisdictions": jurisdictions, "data_class": data_class},
	"candidates": [eu_dc, eu_edge, us_dc],
}

test_public_data_anywhere if {
	residency.allow == {"eu", "eu-edge", "us"} with input as req([], "public")
}

test_allowed_jurisdictions_restrict_sites if {
	residency.allow == {"eu", "eu-edge"} with input as req(["EU"], "public")
	residency.reason.us == "site us-dc is in US, outside the allowed jurisdictions [\"EU\"]" with input as req(["EU"], "public")
}

test_personal_data_stays_in_the_eu if {
	residency.allow == {"eu", "eu-edge"} with input as req([], "personal")
	contains(residency.reason.us, "personal data may only be processed in") with input as req([], "personal")
}

test_phi_needs_hipaa_sites if {
	residency.allow == {"eu", "us"} with input as req([], "phi")
	contains(residency.reason["eu-edge"], "needs a hipaa-certified site") with input as req([], "phi")
}

test_restrictions_combine if {
	residency.allow == {"eu"} with input as req(["EU"], "phi")
	not residency.allow == {"eu"} with input as req(["US"], "phi")
}

test_no_candidate_allowed_when_none_fits if {
	count(residency.allow) == 0 with input as req(["CH"], "public")
}
