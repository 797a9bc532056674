package infermesh.residency_test

import rego.v1

import data.infermesh.residency

params := {"data_class_jurisdictions": {"personal": ["EU"]}, "data_class_certifications": {"phi": ["hipaa"]}}

eu_site := {"site_id": "eu1", "jurisdiction": "EU", "certifications": ["iso27001"]}

us_hipaa := {"site_id": "us1", "jurisdiction": "US", "certifications": ["hipaa"]}

test_unrestricted_public_request_goes_anywhere if {
	count(residency.site_violations({"allowed_jurisdictions": [], "data_class": "public"}, us_hipaa, params)) == 0
}

test_allowed_jurisdictions_exclude_other_sites if {
	count(residency.site_violations({"allowed_jurisdictions": ["EU"], "data_class": "public"}, us_hipaa, params)) == 1
	count(residency.site_violations({"allowed_jurisdictions": ["EU"], "data_class": "public"}, eu_site, params)) == 0
}

test_personal_data_stays_in_the_eu if {
	count(residency.site_violations({"allowed_jurisdictions": [], "data_class": "personal"}, us_hipaa, params)) == 1
	count(residency.site_violations({"allowed_jurisdictions": [], "data_class": "personal"}, eu_site, params)) == 0
}

test_phi_needs_a_hipaa_site if {
	count(residency.site_violations({"allowed_jurisdictions": [], "data_class": "phi"}, eu_site, params)) == 1
	count(residency.site_violations({"allowed_jurisdictions": [], "data_class": "phi"}, us_hipaa, params)) == 0
}
