package main

// Avro single-object encoding, written out from the Avro specification (standard
// library only): the schema's Parsing Canonical Form, its CRC-64-AVRO fingerprint
// and the binary encoding of a datum. tally's schemas are small (records of
// primitives, enums, maps, arrays, ["null", T] unions, and the logical types
// uuid, timestamp-micros and decimal), so this covers them all.
//
// Why not an Avro library's own single-object support: goavro (v2.10, Debian's
// golang-github-linkedin-goavro-dev) keeps logicalType attributes in what it calls
// the canonical form, so its Codec.Rabin and SingleFromNative carry a fingerprint
// that is not the specification's (llm.usage.v1 v2: 0f86c1eaff3759a9 instead of
// 11f3645e6d3e53d5) and tally dead-letters the message as unknown_fingerprint. A
// library's binary datum (e.g. goavro's BinaryFromNative) is fine: prefix it with
// singleObjectHeader below.

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// loadSchema returns the current (highest-numbered) schema of subject, parsed
// into generic JSON values, and its file name.
func loadSchema(dir, subject string) (interface{}, string, error) {
	files, err := filepath.Glob(filepath.Join(dir, subject, "v*.avsc"))
	if err != nil || len(files) == 0 {
		return nil, "", fmt.Errorf("no schema files in %s", filepath.Join(dir, subject))
	}
	version := func(f string) int {
		n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(f), "v"), ".avsc"))
		return n
	}
	sort.Slice(files, func(i, j int) bool { return version(files[i]) < version(files[j]) })
	latest := files[len(files)-1]
	text, err := os.ReadFile(latest)
	if err != nil {
		return nil, "", err
	}
	var schema interface{}
	if err := json.Unmarshal(text, &schema); err != nil {
		return nil, "", fmt.Errorf("%s: %v", latest, err)
	}
	return schema, filepath.Base(latest), nil
}

var primitives = map[string]bool{
	"null": true, "boolean": true, "int": true, "long": true,
	"float": true, "double": true, "bytes": true, "string": true,
}

// quote is JSON string quoting without HTML escaping.
func quote(s string) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	return strings.TrimSuffix(b.String(), "\n")
}

func fullName(name, namespace string) string {
	if strings.Contains(name, ".") || namespace == "" {
		return name
	}
	return namespace + "." + name
}

// pcf is the Parsing Canonical Form (Avro specification, "Transforming into
// Parsing Canonical Form"): full names; only name, type, fields, symbols, items,
// values, size, in that order; primitives as bare strings; no whitespace. So
// logical types ({"type":"long","logicalType":"timestamp-micros"}) become their
// underlying type ("long").
func pcf(schema interface{}, namespace string) string {
	switch s := schema.(type) {
	case string:
		if primitives[s] {
			return quote(s)
		}
		return quote(fullName(s, namespace))
	case []interface{}:
		parts := make([]string, len(s))
		for i, branch := range s {
			parts[i] = pcf(branch, namespace)
		}
		return "[" + strings.Join(parts, ",") + "]"
	case map[string]interface{}:
		t, isName := s["type"].(string)
		if !isName {
			return pcf(s["type"], namespace) // {"type": {...}}
		}
		switch t {
		case "record", "enum", "fixed", "array", "map":
		default:
			return pcf(t, namespace) // a primitive with attributes, or a named type
		}
		var parts []string
		if t == "record" || t == "enum" || t == "fixed" {
			ns, _ := s["namespace"].(string)
			if ns == "" {
				ns = namespace
			}
			name := fullName(s["name"].(string), ns)
			if i := strings.LastIndex(name, "."); i >= 0 {
				namespace = name[:i]
			} else {
				namespace = ""
			}
			parts = append(parts, `"name":`+quote(name))
		}
		parts = append(parts, `"type":`+quote(t))
		switch t {
		case "record":
			var fields []string
			for _, f := range s["fields"].([]interface{}) {
				field := f.(map[string]interface{})
				fields = append(fields, `{"name":`+quote(field["name"].(string))+`,"type":`+pcf(field["type"], namespace)+`}`)
			}
			parts = append(parts, `"fields":[`+strings.Join(fields, ",")+`]`)
		case "enum":
			var symbols []string
			for _, sym := range s["symbols"].([]interface{}) {
				symbols = append(symbols, quote(sym.(string)))
			}
			parts = append(parts, `"symbols":[`+strings.Join(symbols, ",")+`]`)
		case "array":
			parts = append(parts, `"items":`+pcf(s["items"], namespace))
		case "map":
			parts = append(parts, `"values":`+pcf(s["values"], namespace))
		case "fixed":
			parts = append(parts, `"size":`+strconv.Itoa(int(s["size"].(float64))))
		}
		return "{" + strings.Join(parts, ",") + "}"
	}
	panic(fmt.Sprintf("not an Avro schema: %v", schema))
}

// ParsingCanonicalForm of a parsed schema.
func ParsingCanonicalForm(schema interface{}) string { return pcf(schema, "") }

// crc64Empty is the specification's EMPTY: initial value and table seed.
const crc64Empty uint64 = 0xc15d213aa4d7a795

var crc64Table = func() (t [256]uint64) {
	for i := range t {
		fp := uint64(i)
		for j := 0; j < 8; j++ {
			fp = (fp >> 1) ^ (crc64Empty & -(fp & 1))
		}
		t[i] = fp
	}
	return t
}()

// Fingerprint is CRC-64-AVRO (the specification's 64-bit Rabin fingerprint) of
// the schema's Parsing Canonical Form.
func Fingerprint(schema interface{}) uint64 {
	fp := crc64Empty
	for _, b := range []byte(ParsingCanonicalForm(schema)) {
		fp = (fp >> 8) ^ crc64Table[byte(fp)^b]
	}
	return fp
}

// singleObjectHeader is C3 01, then the fingerprint, little-endian.
func singleObjectHeader(schema interface{}) []byte {
	h := make([]byte, 10)
	h[0], h[1] = 0xc3, 0x01
	binary.LittleEndian.PutUint64(h[2:], Fingerprint(schema))
	return h
}

// SingleObject encodes value (JSON-shaped: the event as it is sent in JSON)
// with schema: the single-object header, then the Avro binary datum.
func SingleObject(schema interface{}, value map[string]interface{}) ([]byte, error) {
	var out bytes.Buffer
	out.Write(singleObjectHeader(schema))
	if err := encode(&out, schema, value); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// writeLong is Avro's zig-zag varint.
func writeLong(out *bytes.Buffer, n int64) {
	var b [binary.MaxVarintLen64]byte
	out.Write(b[:binary.PutVarint(b[:], n)]) // PutVarint zig-zags, as Avro does
}

func writeBytes(out *bytes.Buffer, b []byte) {
	writeLong(out, int64(len(b)))
	out.Write(b)
}

func asInt64(v interface{}) (int64, error) {
	switch n := v.(type) {
	case int:
		return int64(n), nil
	case int64:
		return n, nil
	case float64: // a default read from the schema's JSON
		return int64(n), nil
	}
	return 0, fmt.Errorf("%v (%T) is not an integer", v, v)
}

// micros parses an RFC 3339 timestamp into microseconds since the Unix epoch.
func micros(v interface{}) (int64, error) {
	s, ok := v.(string)
	if !ok {
		return 0, fmt.Errorf("timestamp %v is not a string", v)
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return 0, err
	}
	return t.UnixMicro(), nil
}

// decimalBytes is the two's-complement big-endian unscaled integer of a decimal
// string (value x 10^scale), in as few bytes as hold it (at least one).
func decimalBytes(v interface{}, scale int) ([]byte, error) {
	s, ok := v.(string)
	if !ok {
		return nil, fmt.Errorf("decimal %v is not a string (send decimals as strings)", v)
	}
	neg := strings.HasPrefix(s, "-")
	whole, frac, _ := strings.Cut(strings.TrimPrefix(s, "-"), ".")
	if len(frac) > scale {
		return nil, fmt.Errorf("decimal %s has more than %d fractional digits", s, scale)
	}
	n, ok := new(big.Int).SetString(whole+frac+strings.Repeat("0", scale-len(frac)), 10)
	if !ok {
		return nil, fmt.Errorf("bad decimal %q", s)
	}
	if neg {
		n.Neg(n)
	}
	// Smallest length whose signed range holds n.
	for size := 1; ; size++ {
		limit := new(big.Int).Lsh(big.NewInt(1), uint(8*size-1))
		if n.Cmp(limit) < 0 && n.Cmp(new(big.Int).Neg(limit)) >= 0 {
			if n.Sign() < 0 {
				n.Add(n, new(big.Int).Lsh(big.NewInt(1), uint(8*size)))
			}
			b := n.Bytes()
			return append(make([]byte, size-len(b)), b...), nil
		}
	}
}

// encode writes value under schema in Avro's binary encoding.
func encode(out *bytes.Buffer, schema, value interface{}) error {
	switch s := schema.(type) {
	case []interface{}: // a union: ["null", T]
		for i, branch := range s {
			if (value == nil) == (branch == "null") {
				writeLong(out, int64(i))
				return encode(out, branch, value)
			}
		}
		return fmt.Errorf("no branch of %v for %v", s, value)
	case string:
		return encode(out, map[string]interface{}{"type": s}, value)
	}
	s := schema.(map[string]interface{})
	if inner, ok := s["type"].(map[string]interface{}); ok {
		return encode(out, inner, value)
	}
	t, _ := s["type"].(string)
	logical, _ := s["logicalType"].(string)
	switch {
	case t == "record":
		record, _ := value.(map[string]interface{})
		for _, f := range s["fields"].([]interface{}) {
			field := f.(map[string]interface{})
			v, present := record[field["name"].(string)]
			if !present {
				v = field["default"]
			}
			if err := encode(out, field["type"], v); err != nil {
				return fmt.Errorf("%s: %v", field["name"], err)
			}
		}
	case t == "enum":
		for i, sym := range s["symbols"].([]interface{}) {
			if sym == value {
				writeLong(out, int64(i))
				return nil
			}
		}
		return fmt.Errorf("%v is not a symbol of %v", value, s["name"])
	case t == "array":
		items, _ := value.([]string) // tally's arrays are of strings
		if len(items) > 0 {
			writeLong(out, int64(len(items)))
			for _, item := range items {
				if err := encode(out, s["items"], item); err != nil {
					return err
				}
			}
		}
		writeLong(out, 0)
	case t == "map":
		m, _ := value.(map[string]string) // tally's maps are of strings
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		if len(keys) > 0 {
			writeLong(out, int64(len(keys)))
			for _, k := range keys {
				writeBytes(out, []byte(k))
				if err := encode(out, s["values"], m[k]); err != nil {
					return err
				}
			}
		}
		writeLong(out, 0)
	case t == "long" && logical == "timestamp-micros":
		us, err := micros(value)
		if err != nil {
			return err
		}
		writeLong(out, us)
	case t == "bytes" && logical == "decimal":
		b, err := decimalBytes(value, int(s["scale"].(float64)))
		if err != nil {
			return err
		}
		writeBytes(out, b)
	case t == "long" || t == "int":
		n, err := asInt64(value)
		if err != nil {
			return err
		}
		writeLong(out, n)
	case t == "boolean":
		if value == true {
			out.WriteByte(1)
		} else {
			out.WriteByte(0)
		}
	case t == "string":
		str, ok := value.(string)
		if !ok {
			return fmt.Errorf("%v is not a string", value)
		}
		writeBytes(out, []byte(str))
	case t == "null":
	default:
		return fmt.Errorf("type %q is not supported by this example", t)
	}
	return nil
}
