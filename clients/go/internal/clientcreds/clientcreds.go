// Package clientcreds gives the Go programs of this module (the example and the load
// generator) the same TLS and API key options, and turns them into grpc dial options:
//
//	--tls-ca FILE      TLS, trusting the CA certificates in FILE (PEM) instead of the system's
//	--tls-cert FILE    with --tls-key: TLS with this client certificate (PEM chain), for mTLS
//	--tls-key FILE     the client certificate's private key (PEM, unencrypted)
//	--api-key KEY      sent as "authorization: Bearer KEY" metadata on every call
//
// Any --tls-* flag turns TLS on; with none the connection is plaintext, as before. The API key
// is sent on plaintext connections too: a gateway on loopback may take keys without TLS.
//
// Only API that Debian's grpc-go 1.33 has is used: credentials.NewTLS and
// credentials.PerRPCCredentials.
package clientcreds

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// Flags are the values of the options above.
type Flags struct {
	CA     string
	Cert   string
	Key    string
	APIKey string
}

// Register adds the options to fs.
func (f *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&f.CA, "tls-ca", "", "TLS: trust the CA certificates in this PEM file (default: plaintext; with only --tls-cert/--tls-key, the system's CAs)")
	fs.StringVar(&f.Cert, "tls-cert", "", "mTLS: the client certificate chain, a PEM file (with --tls-key)")
	fs.StringVar(&f.Key, "tls-key", "", "mTLS: the client certificate's private key, an unencrypted PEM file (with --tls-cert)")
	fs.StringVar(&f.APIKey, "api-key", "", `send "authorization: Bearer KEY" metadata on every call`)
}

// TLS reports whether the connection is to use TLS.
func (f *Flags) TLS() bool {
	return f.CA != "" || f.Cert != "" || f.Key != ""
}

// Check reports a bad combination of options without reading any file.
func (f *Flags) Check() error {
	if (f.Cert == "") != (f.Key == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	for _, c := range f.APIKey {
		if c < 0x20 || c > 0x7e {
			return errors.New("--api-key must be printable ASCII")
		}
	}
	return nil
}

// DialOptions are the transport and per-call credentials the options ask for. An error names
// the option and the file.
func (f *Flags) DialOptions() ([]grpc.DialOption, error) {
	if err := f.Check(); err != nil {
		return nil, err
	}
	var opts []grpc.DialOption
	if f.TLS() {
		config, err := f.tlsConfig()
		if err != nil {
			return nil, err
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	} else {
		opts = append(opts, grpc.WithInsecure())
	}
	if f.APIKey != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(f.APIKey)))
	}
	return opts, nil
}

func (f *Flags) tlsConfig() (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.CA != "" {
		pem, err := os.ReadFile(f.CA)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca %s: cannot read: %v", f.CA, unwrapPath(err))
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", f.CA)
		}
		config.RootCAs = pool
	}
	if f.Cert != "" {
		for _, file := range []struct{ flag, path string }{{"--tls-cert", f.Cert}, {"--tls-key", f.Key}} {
			if _, err := os.Stat(file.path); err != nil {
				return nil, fmt.Errorf("%s %s: cannot read: %v", file.flag, file.path, unwrapPath(err))
			}
		}
		pair, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert %s, --tls-key %s: %v", f.Cert, f.Key, err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// unwrapPath drops the operation and path that a *fs.PathError repeats.
func unwrapPath(err error) error {
	var pathErr *os.PathError
	if errors.As(err, &pathErr) {
		return pathErr.Err
	}
	return err
}

// bearer sends an API key as "authorization: Bearer KEY" on every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: a gateway on loopback may take keys over plaintext, and
// grpc-go would otherwise refuse to dial without TLS.
func (b bearer) RequireTransportSecurity() bool { return false }
