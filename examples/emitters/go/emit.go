// Command emit is an example emitter for tally's three input contracts
// (docs/emitters.md), in Go.
//
// It sends one valid event of each stream -- llm.usage.v1, policy.decision.v1,
// audit.event.v1 -- in JSON and in Avro single-object encoding, keyed by tenant id.
// The Avro encoding, the schema's Parsing Canonical Form and its CRC-64-AVRO
// fingerprint are written out in avro.go from the Avro specification; the schemas
// are read from schemas/avro/<subject>/v<N>.avsc (the highest N is current).
//
// Kafka: github.com/Shopify/sarama (pure Go; Debian's golang-github-shopify-sarama-dev),
// acks=all, record batches (Kafka >= 0.11 message format), partitions chosen by
// CRC-32 of the key like librdkafka's default partitioner (kcat, tally gen), so
// one tenant's events share a partition whichever of these sent them.
//
// Build offline from Debian's packages (no module proxy needed):
//
//	apt-get install golang-go golang-github-shopify-sarama-dev
//	cd examples/emitters/go
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o emit .
//	./emit -brokers 127.0.0.1:9092
//	./emit -out /tmp/payloads   # write payloads and manifest.json instead of sending
//
// With Go modules instead: `go mod init example.com/emit && go get github.com/IBM/sarama`
// and import github.com/IBM/sarama (sarama's current path).
//
// Prints one JSON line per message: topic, key, encoding, id (event_id or decision_id).
package main

import (
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"time"

	"github.com/Shopify/sarama"
)

// now is UTC with microsecond precision: the same instant in JSON and Avro.
func now() string {
	return time.Now().UTC().Truncate(time.Microsecond).Format("2006-01-02T15:04:05.000000Z07:00")
}

func uuid4() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// Events are JSON-shaped maps: the JSON payload as is, and the Avro datum's
// values (timestamps as RFC 3339 strings, decimals as strings, null as nil).
type event = map[string]interface{}

func usageEvent(tenant, encoding string) event {
	return event{
		"event_id":            uuid4(),
		"occurred_at":         now(),
		"tenant_id":           tenant,
		"team_id":             "team-search",
		"project_id":          nil,
		"user_id":             nil,
		"source":              "example-gateway",
		"tags":                map[string]string{"emitter": "go-" + encoding},
		"request_id":          "req-" + uuid4()[:8],
		"provider":            "openai",
		"model":               "gpt-4o-mini",
		"input_tokens":        1200,
		"cached_input_tokens": 300,
		"cache_write_tokens":  0,
		"output_tokens":       450,
		"reasoning_tokens":    0,
		"latency_ms":          812,
		"status":              "success",
		"reported_cost":       "0.000495", // a decimal string, never a float
		"currency":            "USD",
		"region":              "eu-west-1",
	}
}

func policyDecision(tenant, encoding string) event {
	return event{
		// Any UUID; the dedup key of a decision is (tenant_id, decision_id).
		"event_id":       uuid4(),
		"occurred_at":    now(),
		"tenant_id":      tenant,
		"team_id":        nil,
		"project_id":     "proj-42",
		"user_id":        nil,
		"source":         "example-policy-engine",
		"tags":           map[string]string{"emitter": "go-" + encoding},
		"decision_id":    "dec-" + uuid4(),
		"request_id":     "req-" + uuid4()[:8],
		"policy_id":      "pii-redaction",
		"policy_version": "3",
		"decision":       "allow",
		"enforcement":    "enforce",
		"severity":       "low",
		"rule_ids":       []string{"email"},
		"reason":         "no personal data found",
		"evaluation_ms":  3,
	}
}

func auditEvent(tenant, encoding string) event {
	return event{
		"event_id":      uuid4(),
		"occurred_at":   now(),
		"tenant_id":     tenant,
		"team_id":       "team-search",
		"project_id":    nil,
		"user_id":       nil,
		"source":        "example-admin-api",
		"tags":          map[string]string{"emitter": "go-" + encoding},
		"actor_type":    "service",
		"actor_id":      "svc-billing",
		"action":        "budget.update",
		"resource_type": "budget",
		"resource_id":   "budget-9",
		"outcome":       "success",
		"ip":            "192.0.2.10",
		"user_agent":    "example-emitter/1.0",
		"details":       `{"old":"100","new":"250"}`, // JSON text in a string
		"personal_data": false,
	}
}

type message struct {
	Topic    string `json:"topic"`
	Key      string `json:"key"`
	Encoding string `json:"encoding"`
	ID       string `json:"id"`
	File     string `json:"file,omitempty"`
	payload  []byte
}

type options struct {
	brokers, usageTopic, policyTopic, auditTopic string
	tenant, encoding, schemas, out               string
	printFingerprints                            bool
}

func messages(o options) ([]message, error) {
	streams := []struct {
		topic, subject, idField string
		make                    func(tenant, encoding string) event
	}{
		{o.usageTopic, "llm.usage.v1", "event_id", usageEvent},
		{o.policyTopic, "policy.decision.v1", "decision_id", policyDecision},
		{o.auditTopic, "audit.event.v1", "event_id", auditEvent},
	}
	var out []message
	for _, s := range streams {
		schema, _, err := loadSchema(o.schemas, s.subject)
		if err != nil {
			return nil, err
		}
		if o.encoding == "json" || o.encoding == "both" {
			e := s.make(o.tenant, "json")
			body, err := json.Marshal(e)
			if err != nil {
				return nil, err
			}
			out = append(out, message{s.topic, o.tenant, "json", e[s.idField].(string), "", body})
		}
		if o.encoding == "avro" || o.encoding == "both" {
			e := s.make(o.tenant, "avro")
			body, err := SingleObject(schema, e)
			if err != nil {
				return nil, fmt.Errorf("%s: %v", s.subject, err)
			}
			out = append(out, message{s.topic, o.tenant, "avro-single-object", e[s.idField].(string), "", body})
		}
	}
	return out, nil
}

// keyCRC32 picks the partition as librdkafka's default partitioner does for a
// keyed message: CRC-32 (IEEE) of the key modulo the partition count.
type keyCRC32 struct{}

func (keyCRC32) Partition(m *sarama.ProducerMessage, n int32) (int32, error) {
	key, err := m.Key.Encode()
	if err != nil {
		return 0, err
	}
	return int32(crc32.ChecksumIEEE(key) % uint32(n)), nil
}

func (keyCRC32) RequiresConsistency() bool { return true }

// send produces every message and waits for each acknowledgement (acks=all).
func send(brokers string, msgs []message) error {
	cfg := sarama.NewConfig()
	cfg.ClientID = "tally-example-emitter"
	cfg.Version = sarama.V2_0_0_0 // record batches; any broker since Kafka 2.0
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Retry.Max = 10
	cfg.Producer.Return.Successes = true
	cfg.Producer.Partitioner = func(string) sarama.Partitioner { return keyCRC32{} }
	producer, err := sarama.NewSyncProducer([]string{brokers}, cfg)
	if err != nil {
		return fmt.Errorf("connect to %s: %v", brokers, err)
	}
	for _, m := range msgs {
		_, _, err := producer.SendMessage(&sarama.ProducerMessage{
			Topic: m.Topic,
			Key:   sarama.StringEncoder(m.Key),
			Value: sarama.ByteEncoder(m.payload),
		})
		if err != nil {
			producer.Close()
			return fmt.Errorf("send to %s: %v", m.Topic, err)
		}
	}
	return producer.Close()
}

func writeOut(dir string, msgs []message) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for i := range msgs {
		msgs[i].File = fmt.Sprintf("%02d-%s.bin", i, msgs[i].Encoding)
		if err := os.WriteFile(filepath.Join(dir, msgs[i].File), msgs[i].payload, 0o644); err != nil {
			return err
		}
	}
	manifest, err := json.MarshalIndent(msgs, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "manifest.json"), manifest, 0o644)
}

// defaultSchemas is the repository's schemas/avro, found from the binary (built
// in examples/emitters/go) or the working directory.
func defaultSchemas() string {
	var starts []string
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	for _, start := range starts {
		for _, up := range []string{".", "..", "../..", "../../.."} {
			dir := filepath.Join(start, up, "schemas", "avro")
			if _, err := os.Stat(filepath.Join(dir, "llm.usage.v1")); err == nil {
				return filepath.Clean(dir)
			}
		}
	}
	return "schemas/avro"
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func run() error {
	var o options
	flag.StringVar(&o.brokers, "brokers", env("TALLY__KAFKA__BROKERS", "127.0.0.1:9092"), "bootstrap broker host:port")
	flag.StringVar(&o.usageTopic, "usage-topic", env("TALLY__KAFKA__USAGE_TOPIC", "llm.usage.v1"), "")
	flag.StringVar(&o.policyTopic, "policy-topic", env("TALLY__POLICY__TOPIC", "policy.decision.v1"), "")
	flag.StringVar(&o.auditTopic, "audit-topic", env("TALLY__AUDIT__TOPIC", "audit.event.v1"), "")
	flag.StringVar(&o.tenant, "tenant", "tenant-acme", "tenant id (and message key)")
	flag.StringVar(&o.encoding, "encoding", "both", "json, avro or both")
	flag.StringVar(&o.schemas, "schemas", defaultSchemas(), "directory of <subject>/v<N>.avsc")
	flag.StringVar(&o.out, "out", "", "write payloads and manifest.json here instead of sending")
	flag.BoolVar(&o.printFingerprints, "print-fingerprints", false, "print each subject's fingerprint and Parsing Canonical Form, then exit")
	flag.Parse()
	if o.encoding != "json" && o.encoding != "avro" && o.encoding != "both" {
		return fmt.Errorf("-encoding must be json, avro or both, not %q", o.encoding)
	}
	stdout := json.NewEncoder(os.Stdout)
	if o.printFingerprints {
		for _, subject := range []string{"llm.usage.v1", "policy.decision.v1", "audit.event.v1", "compliance.violation.v1"} {
			schema, _, err := loadSchema(o.schemas, subject)
			if err != nil {
				return err
			}
			_ = stdout.Encode(map[string]string{
				"subject":        subject,
				"fingerprint":    fmt.Sprintf("%016x", Fingerprint(schema)),
				"canonical_form": ParsingCanonicalForm(schema),
			})
		}
		return nil
	}
	msgs, err := messages(o)
	if err != nil {
		return err
	}
	if o.out != "" {
		err = writeOut(o.out, msgs)
	} else {
		err = send(o.brokers, msgs)
	}
	if err != nil {
		return err
	}
	for _, m := range msgs {
		_ = stdout.Encode(map[string]string{"topic": m.Topic, "key": m.Key, "encoding": m.Encoding, "id": m.ID})
	}
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "emit:", err)
		os.Exit(1)
	}
}
